package cbtsim

import (
	"crypto/rand"
	"errors"
	"fmt"
	"log"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// The tracker is the part of the simulator that knows what is in the disks.
//
// It keeps, per VM and per virtual disk, which blocks were ever written (allocation) and,
// while Changed Block Tracking is on, the sequence number of each block's last write.
// It never replaces the simulator's own objects: it observes them through the registry's
// RegisterObject hooks (snapshot created, snapshot removed, VM reconfigured) and answers
// QueryChangedDiskAreas through the registry's method Handler. All state of one VM is
// guarded by that VM's simulator object lock (held by every SOAP call and task on the VM,
// and taken by the control API) and, inside it, by vmState.mu.
//
// Change IDs: "<cbt uuid>/<seq>". The state named by seq N of a disk is "every write
// whose sequence is <= N". Each guest write operation takes the next sequence number;
// each snapshot takes one too and records it in its disk backings. A query against a
// snapshot taken at sequence T with changeId "<uuid>/C" reports the blocks whose last
// write before the snapshot has a sequence in (C, T].
type tracker struct {
	reg       *simulator.Registry
	blockSize int64
	pageSize  int
	logf      func(format string, args ...any)
	panics    *panicNet

	mu        sync.Mutex
	vms       map[types.ManagedObjectReference]*vmState
	snapOwner map[types.ManagedObjectReference]types.ManagedObjectReference
}

type vmState struct {
	mu       sync.Mutex
	ref      types.ManagedObjectReference
	cbt      bool
	unsorted bool // QueryChangedDiskAreas shuffles each page's areas (CBTRequest.Unsorted)
	// QueryChangedDiskAreas waits this long (ms) before answering (CBTRequest.QueryDelayMs);
	// atomic, read before any lock is taken.
	queryDelayMs atomic.Int64
	queriesHeld  atomic.Int32 // calls waiting out queryDelayMs now
	disks        map[int32]*diskState
	snaps        map[types.ManagedObjectReference]*snapState
}

// diskState is the live disk.
type diskState struct {
	key      int32
	fileName string // datastore path of the descriptor, as in the device backing ("[ds] dir/x.vmdk")
	descPath string // absolute path of the descriptor file
	flatPath string // absolute path of the raw data file ("dir/x-flat.vmdk")
	uuid     string // the backing's disk uuid
	capacity int64

	written   []bool   // per block: ever written since the disk was created (allocated)
	lastWrite []uint64 // per block: sequence of the last write since CBT (re)started; nil when off
	cbtUUID   string   // "" when change tracking is off
	seq       uint64
}

// frozenDisk is a disk as captured by a snapshot: its own immutable files and bitmaps.
type frozenDisk struct {
	key       int32
	fileName  string
	descPath  string
	flatPath  string
	capacity  int64
	written   []bool
	lastWrite []uint64
	cbtUUID   string
	seq       uint64
	err       error // the freeze failed; queries and reads of this disk fail
}

func (d *frozenDisk) changeID() string {
	if d.cbtUUID == "" {
		return ""
	}
	return fmt.Sprintf("%s/%d", d.cbtUUID, d.seq)
}

type snapState struct {
	ref   types.ManagedObjectReference
	disks map[int32]*frozenDisk
	vmsn  string // the simulator's snapshot file, which its RemoveSnapshot fails to delete
}

func newTracker(reg *simulator.Registry, blockSize int64, pageSize int, logger *log.Logger) *tracker {
	logf := func(string, ...any) {}
	if logger != nil {
		logf = logger.Printf
	}
	return &tracker{
		reg:       reg,
		blockSize: blockSize,
		pageSize:  pageSize,
		logf:      logf,
		vms:       map[types.ManagedObjectReference]*vmState{},
		snapOwner: map[types.ManagedObjectReference]types.ManagedObjectReference{},
	}
}

func (t *tracker) nblocks(capacity int64) int64 {
	return (capacity + t.blockSize - 1) / t.blockSize
}

func (d *diskState) changeID() string {
	if d.cbtUUID == "" {
		return ""
	}
	return fmt.Sprintf("%s/%d", d.cbtUUID, d.seq)
}

// startCBT (re)starts change tracking with a new uuid: every earlier changeId of the
// disk becomes invalid, as after a CBT reset, a disk resize or a disk re-creation.
func (d *diskState) startCBT(nblocks int64) {
	d.cbtUUID = newCBTUUID()
	d.seq = 0
	d.lastWrite = make([]uint64, nblocks)
}

func (d *diskState) stopCBT() {
	d.cbtUUID = ""
	d.seq = 0
	d.lastWrite = nil
}

// recordWrite marks [off, off+n) as written (and changed, with the current sequence).
func (d *diskState) recordWrite(blockSize, off, n int64) {
	if n <= 0 {
		return
	}
	for b := off / blockSize; b <= (off+n-1)/blockSize; b++ {
		d.written[b] = true
		if d.lastWrite != nil {
			d.lastWrite[b] = d.seq
		}
	}
}

// newCBTUUID returns a uuid in the form vCenter uses in change IDs:
// "52 8f 3a 0c 11 22 33 44-55 66 77 88 99 aa bb cc".
func newCBTUUID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	b[0] = 0x52 // vCenter's change IDs start with "52 "
	var sb strings.Builder
	for i, c := range b {
		switch {
		case i == 8:
			sb.WriteByte('-')
		case i > 0:
			sb.WriteByte(' ')
		}
		fmt.Fprintf(&sb, "%02x", c)
	}
	return sb.String()
}

// diskCapacity is what the simulator uses too: capacityInBytes, else capacityInKB.
func diskCapacity(d *types.VirtualDisk) int64 {
	if d.CapacityInBytes > 0 {
		return d.CapacityInBytes
	}
	return d.CapacityInKB * 1024
}

// FlatFileName maps a disk descriptor name to its raw data file, like VMware does for
// monolithic flat disks: "dir/name.vmdk" -> "dir/name-flat.vmdk".
func FlatFileName(descriptor string) string {
	return simulator.VirtualDiskBackingFileName(descriptor)
}

// datastoreDir returns the local directory of the named datastore.
func (t *tracker) datastoreDir(name string) (string, error) {
	for _, e := range t.reg.All("Datastore") {
		if ds, ok := e.(*simulator.Datastore); ok && ds.Name == name {
			u := ds.Summary.Url
			if u == "" {
				u = ds.Info.GetDatastoreInfo().Url
			}
			return u, nil
		}
	}
	return "", fmt.Errorf("datastore %q not found", name)
}

// resolve maps a datastore path ("[ds] dir/x.vmdk") to the local descriptor and flat files.
func (t *tracker) resolve(fileName string) (desc, flat string, err error) {
	var p object.DatastorePath
	if !p.FromString(fileName) || p.Path == "" {
		return "", "", fmt.Errorf("invalid datastore path %q", fileName)
	}
	dir, err := t.datastoreDir(p.Datastore)
	if err != nil {
		return "", "", err
	}
	return filepath.Join(dir, filepath.FromSlash(p.Path)), filepath.Join(dir, filepath.FromSlash(FlatFileName(p.Path))), nil
}

func (t *tracker) state(ref types.ManagedObjectReference) *vmState {
	t.mu.Lock()
	defer t.mu.Unlock()
	st := t.vms[ref]
	if st == nil {
		st = &vmState{
			ref:   ref,
			disks: map[int32]*diskState{},
			snaps: map[types.ManagedObjectReference]*snapState{},
		}
		t.vms[ref] = st
	}
	return st
}

// sync reconciles the tracker's view of a VM with its configuration: disks added,
// removed, replaced or resized, and CBT switched on or off. It stamps the current
// changeId into each live disk backing. The caller holds the VM's simulator lock and
// st.mu.
func (t *tracker) sync(ctx *simulator.Context, vm *simulator.VirtualMachine, st *vmState) error {
	if vm.Config == nil {
		return nil
	}
	cbtOn := vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
	seen := map[int32]bool{}
	changed := false
	var errs []error
	for _, dev := range vm.Config.Hardware.Device {
		disk, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok {
			continue // only flat disks are modelled
		}
		capacity := diskCapacity(disk)
		d := st.disks[disk.Key]
		switch {
		case d == nil || d.fileName != b.FileName:
			nd, err := t.newDisk(disk.Key, b.FileName, capacity, b.Uuid)
			if err != nil {
				errs = append(errs, err)
				delete(st.disks, disk.Key)
				continue
			}
			d = nd
			st.disks[disk.Key] = d
		case capacity != d.capacity:
			if err := t.resizeDisk(d, capacity); err != nil {
				errs = append(errs, err)
			}
			if cbtOn {
				d.startCBT(t.nblocks(capacity)) // a resize resets CBT, as on vSphere
			}
		}
		seen[disk.Key] = true
		switch {
		case cbtOn && d.cbtUUID == "":
			d.startCBT(t.nblocks(d.capacity))
		case !cbtOn && d.cbtUUID != "":
			d.stopCBT()
		}
		if want := d.changeID(); b.ChangeId != want {
			b.ChangeId = want
			changed = true
		}
	}
	for key := range st.disks {
		if !seen[key] {
			delete(st.disks, key)
		}
	}
	st.cbt = cbtOn
	if changed {
		publishDevices(ctx, vm)
	}
	return errors.Join(errs...)
}

// publishDevices tells property collectors (WaitForUpdates) that the devices changed.
func publishDevices(ctx *simulator.Context, vm *simulator.VirtualMachine) {
	ctx.Update(vm, []types.PropertyChange{{Name: "config.hardware.device", Val: vm.Config.Hardware.Device}})
}

func (t *tracker) newDisk(key int32, fileName string, capacity int64, uuid string) (*diskState, error) {
	desc, flat, err := t.resolve(fileName)
	if err != nil {
		return nil, err
	}
	if err := ensureSize(flat, capacity); err != nil {
		return nil, fmt.Errorf("disk %d: %w", key, err)
	}
	if err := writeDescriptor(desc, filepath.Base(flat), capacity, uuid); err != nil {
		return nil, fmt.Errorf("disk %d: %w", key, err)
	}
	return &diskState{
		key:      key,
		fileName: fileName,
		descPath: desc,
		flatPath: flat,
		uuid:     uuid,
		capacity: capacity,
		written:  make([]bool, t.nblocks(capacity)),
	}, nil
}

func (t *tracker) resizeDisk(d *diskState, capacity int64) error {
	if err := ensureSize(d.flatPath, capacity); err != nil {
		return fmt.Errorf("resize disk %d: %w", d.key, err)
	}
	n := t.nblocks(capacity)
	if int64(len(d.written)) < n {
		d.written = append(d.written, make([]bool, n-int64(len(d.written)))...)
	} else {
		d.written = d.written[:n]
	}
	if d.lastWrite != nil {
		d.lastWrite = make([]uint64, n)
	}
	d.capacity = capacity
	return writeDescriptor(d.descPath, filepath.Base(d.flatPath), capacity, d.uuid)
}

// syncVM is sync with the locks taken, for callers that hold the VM's simulator lock.
func (t *tracker) syncVM(ctx *simulator.Context, vm *simulator.VirtualMachine) error {
	st := t.state(vm.Self)
	st.mu.Lock()
	defer st.mu.Unlock()
	return t.sync(ctx, vm, st)
}

// ---- simulator.RegisterObject: observe the simulator's own operations ----

// Reference identifies the tracker among the registry's handlers.
func (t *tracker) Reference() types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: "SendenseChangeTracker", Value: "cbt-tracker"}
}

// PutObject sees every object added to the inventory. A new VirtualMachineSnapshot is
// put by CreateSnapshot(Ex)_Task while it holds the VM's lock, after it copied the VM's
// config and before the task completes: the moment to freeze the disks. A VM's
// Destroy_Task is put before its body runs: the moment to make it delete the VM's files
// (destroy.go).
func (t *tracker) PutObject(ctx *simulator.Context, obj mo.Reference) {
	if task, ok := obj.(*simulator.Task); ok {
		if task.Info.DescriptionId == destroyTaskID && task.Execute != nil && task.Info.Entity != nil {
			t.deleteFilesOnDestroy(task)
		}
		return
	}
	snap, ok := obj.(*simulator.VirtualMachineSnapshot)
	if !ok {
		return
	}
	vm, ok := t.reg.Get(snap.Vm).(*simulator.VirtualMachine)
	if !ok {
		return
	}
	t.freeze(ctx, vm, snap)
}

// UpdateObject sees every property change. A successful ReconfigVM_Task ends with a
// config.changeVersion update, still under the VM's lock: sync CBT and disks then, so
// the task completes with the changeIds in place.
//
// CreateVM_Task (and CloneVM_Task, which runs it) ends with a "name" update, once the
// VM's devices exist and the simulator created each new disk's descriptor and an empty
// flat file: sync then, so the task completes with every flat file at its capacity and
// CBT on when the spec asked for it. CreateVM holds no lock on the new VM; Rename_Task
// makes the same update holding it; sync needs neither (st.mu).
//
// CreateSnapshot ends with a snapshot.currentSnapshot update, after the simulator wrote
// its .vmsn file: note that file's name so that removing the snapshot deletes it.
// (Only these three change names are acted on: the tracker's own updates never carry
// them, so this hook never runs inside another tracker call.)
func (t *tracker) UpdateObject(ctx *simulator.Context, obj mo.Reference, changes []types.PropertyChange) {
	ref := obj.Reference()
	if ref.Type != "VirtualMachine" {
		return
	}
	reconfigured := slices.ContainsFunc(changes, func(c types.PropertyChange) bool { return c.Name == "config.changeVersion" })
	named := slices.ContainsFunc(changes, func(c types.PropertyChange) bool { return c.Name == "name" }) // created (or renamed)
	snapshotted := slices.ContainsFunc(changes, func(c types.PropertyChange) bool { return c.Name == "snapshot.currentSnapshot" })
	if !reconfigured && !named && !snapshotted {
		return
	}
	vm, ok := t.reg.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return // still being created
	}
	if reconfigured || named {
		if err := t.syncVM(ctx, vm); err != nil {
			t.logf("vcsim-cbt: sync %s after create or reconfigure: %v", ref.Value, err)
		}
	}
	if snapshotted && vm.Snapshot != nil && vm.Snapshot.CurrentSnapshot != nil {
		st := t.state(vm.Self)
		st.mu.Lock()
		defer st.mu.Unlock()
		s := st.snaps[*vm.Snapshot.CurrentSnapshot]
		if s == nil || s.vmsn != "" {
			return
		}
		for _, sl := range vm.LayoutEx.Snapshot {
			if sl.Key != s.ref {
				continue
			}
			for _, f := range vm.LayoutEx.File {
				if f.Key == sl.DataKey && strings.HasSuffix(f.Name, ".vmsn") {
					if local, _, err := t.resolve(f.Name); err == nil {
						s.vmsn = local
					}
				}
			}
		}
	}
}

// RemoveObject sees objects leaving the inventory: a removed snapshot drops its frozen
// files (and those of any descendant RemoveSnapshot_Task removed with it).
func (t *tracker) RemoveObject(ctx *simulator.Context, ref types.ManagedObjectReference) {
	switch ref.Type {
	case "VirtualMachineSnapshot":
		t.mu.Lock()
		owner, ok := t.snapOwner[ref]
		t.mu.Unlock()
		if !ok {
			return
		}
		st := t.state(owner)
		st.mu.Lock()
		defer st.mu.Unlock()
		t.dropSnapshot(st, ref)
		// RemoveSnapshot_Task(removeChildren=true) takes the children out of the tree
		// but removes only the named snapshot from the inventory: drop what the tree no
		// longer lists.
		vm, ok := t.reg.Get(owner).(*simulator.VirtualMachine)
		if !ok {
			return
		}
		live := map[types.ManagedObjectReference]bool{}
		if vm.Snapshot != nil {
			collectSnapshots(vm.Snapshot.RootSnapshotList, live)
		}
		for sref := range st.snaps {
			if !live[sref] {
				t.dropSnapshot(st, sref)
			}
		}
		vm.RefreshStorageInfo(ctx, nil) // layoutEx.file: forget the deleted files
	case "VirtualMachine":
		t.mu.Lock()
		delete(t.vms, ref)
		for s, owner := range t.snapOwner {
			if owner == ref {
				delete(t.snapOwner, s)
			}
		}
		t.mu.Unlock()
	}
}

func collectSnapshots(tree []types.VirtualMachineSnapshotTree, into map[types.ManagedObjectReference]bool) {
	for _, n := range tree {
		into[n.Snapshot] = true
		collectSnapshots(n.ChildSnapshotList, into)
	}
}

func findSnapshotName(tree []types.VirtualMachineSnapshotTree, ref types.ManagedObjectReference) (string, bool) {
	for _, n := range tree {
		if n.Snapshot == ref {
			return n.Name, true
		}
		if name, ok := findSnapshotName(n.ChildSnapshotList, ref); ok {
			return name, true
		}
	}
	return "", false
}

func (t *tracker) dropSnapshot(st *vmState, ref types.ManagedObjectReference) {
	s, ok := st.snaps[ref]
	if !ok {
		return
	}
	paths := []string{s.vmsn}
	for _, d := range s.disks {
		paths = append(paths, d.flatPath, d.descPath)
	}
	for _, p := range paths {
		if p == "" {
			continue
		}
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.logf("vcsim-cbt: remove %s: %v", p, err)
		}
	}
	delete(st.snaps, ref)
	t.mu.Lock()
	delete(t.snapOwner, ref)
	t.mu.Unlock()
}

// freeze captures every disk of vm for the new snapshot: a sparse copy of each flat file
// under a name of its own, the bitmaps as of now, and a snapshot config whose disk
// backings name the frozen files and carry their changeIds.
func (t *tracker) freeze(ctx *simulator.Context, vm *simulator.VirtualMachine, snap *simulator.VirtualMachineSnapshot) {
	st := t.state(vm.Self)
	st.mu.Lock()
	defer st.mu.Unlock()
	if err := t.sync(ctx, vm, st); err != nil {
		t.logf("vcsim-cbt: sync %s before snapshot: %v", vm.Self.Value, err)
	}
	s := &snapState{ref: snap.Self, disks: map[int32]*frozenDisk{}}
	bumped := false
	for key, d := range st.disks {
		if err := t.markUntrackedData(d); err != nil {
			t.logf("vcsim-cbt: allocation of %s: %v", d.flatPath, err)
		}
		if d.cbtUUID != "" {
			d.seq++ // a snapshot starts a new change epoch, as on vSphere
			bumped = true
		}
		fd := &frozenDisk{
			key:      key,
			capacity: d.capacity,
			written:  slices.Clone(d.written),
			cbtUUID:  d.cbtUUID,
			seq:      d.seq,
		}
		if d.lastWrite != nil {
			fd.lastWrite = slices.Clone(d.lastWrite)
		}
		fd.err = t.freezeFiles(d, fd, snap.Self)
		if fd.err != nil {
			t.logf("vcsim-cbt: snapshot %s of %s disk %d: %v", snap.Self.Value, vm.Self.Value, key, fd.err)
		}
		s.disks[key] = fd
	}
	// The snapshot's config was copied from the VM before this hook ran: point its disk
	// backings at the frozen files.
	for _, dev := range snap.Config.Hardware.Device {
		disk, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		fd := s.disks[disk.Key]
		if !ok || fd == nil {
			continue
		}
		b.FileName = fd.fileName
		b.ChangeId = fd.changeID()
		disk.CapacityInBytes = fd.capacity
		disk.CapacityInKB = fd.capacity / 1024
	}
	st.snaps[snap.Self] = s
	t.mu.Lock()
	t.snapOwner[snap.Self] = vm.Self
	t.mu.Unlock()
	if bumped {
		for _, dev := range vm.Config.Hardware.Device {
			if disk, ok := dev.(*types.VirtualDisk); ok {
				if b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
					if d := st.disks[disk.Key]; d != nil {
						b.ChangeId = d.changeID()
					}
				}
			}
		}
		publishDevices(ctx, vm)
	}
}

// markUntrackedData counts as written (allocated) every block of d's flat file that holds
// a non-zero byte the guest stand-in did not write: data put there behind the simulator's
// back, as a restore through the NFS datastore does. vSphere's "*" query reports a thin
// disk's allocated blocks however the data got there; its change IDs, though, only cover
// writes through the VM, so lastWrite is left alone. Only blocks not yet marked are read.
func (t *tracker) markUntrackedData(d *diskState) error {
	f, err := os.Open(d.flatPath)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	segs, err := dataSegments(f, min(d.capacity, st.Size()))
	if err != nil {
		return err
	}
	bs := t.blockSize
	buf := make([]byte, min(bs, copyBufSize))
	for _, s := range segs {
		for b := s[0] / bs; b*bs < s[1]; b++ {
			if d.written[b] {
				continue
			}
			data, err := holdsData(f, max(b*bs, s[0]), min((b+1)*bs, s[1]), buf)
			if err != nil {
				return err
			}
			d.written[b] = data
		}
	}
	return nil
}

// freezeFiles writes the frozen descriptor and flat files of d for snapshot ref:
// "[ds] dir/x.vmdk" is frozen as "[ds] dir/x-<snapshot moref>.vmdk" with its data in
// "dir/x-<snapshot moref>-flat.vmdk".
func (t *tracker) freezeFiles(d *diskState, fd *frozenDisk, ref types.ManagedObjectReference) error {
	var p object.DatastorePath
	if !p.FromString(d.fileName) {
		return fmt.Errorf("invalid datastore path %q", d.fileName)
	}
	p.Path = strings.TrimSuffix(p.Path, ".vmdk") + "-" + ref.Value + ".vmdk"
	fd.fileName = p.String()
	desc, flat, err := t.resolve(fd.fileName)
	if err != nil {
		return err
	}
	if err := sparseCopy(d.flatPath, flat, d.capacity); err != nil {
		return err
	}
	fd.flatPath = flat
	if err := writeDescriptor(desc, path.Base(filepath.ToSlash(flat)), d.capacity, d.uuid); err != nil {
		return err
	}
	fd.descPath = desc
	return nil
}
