package cbtsim

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"runtime/debug"
	"sort"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

// The guest stand-in: operations the control API offers on a VM's live disks, and
// read-back of checksums. Each runs under the VM's simulator lock, so it is atomic with
// respect to snapshots, reconfigurations and change queries.

const maxWriteSize = 64 << 20

type apiError struct {
	status int
	msg    string
}

func (e *apiError) Error() string { return e.msg }

func errorf(status int, format string, args ...any) error {
	return &apiError{status: status, msg: fmt.Sprintf(format, args...)}
}

func (t *tracker) newContext() *simulator.Context {
	return &simulator.Context{
		Context: context.Background(),
		Map:     t.reg,
		Session: &simulator.Session{Registry: simulator.NewRegistry(), Map: t.reg},
	}
}

// findVM accepts a VM's name, moref value ("vm-42") or instance UUID.
func (t *tracker) findVM(id string) (*simulator.VirtualMachine, error) {
	for _, e := range t.reg.All("VirtualMachine") {
		vm, ok := e.(*simulator.VirtualMachine)
		if !ok {
			continue
		}
		if vm.Self.Value == id || vm.Name == id || (vm.Config != nil && vm.Config.InstanceUuid == id) {
			return vm, nil
		}
	}
	return nil, errorf(http.StatusNotFound, "vm %q not found", id)
}

// withVM runs fn with the VM locked and its tracker state in sync.
func (t *tracker) withVM(id string, fn func(ctx *simulator.Context, vm *simulator.VirtualMachine, st *vmState) error) error {
	vm, err := t.findVM(id)
	if err != nil {
		return err
	}
	ctx := t.newContext()
	ctx.WithLock(vm, func() {
		// The simulator's WithLock does not release the lock on a panic: keep one from
		// escaping, or the VM stays locked forever.
		defer func() {
			if r := recover(); r != nil {
				err = fmt.Errorf("internal error: %v", r)
				t.logf("vcsim-cbt: panic on %s: %v\n%s", vm.Self.Value, r, debug.Stack())
			}
		}()
		st := t.state(vm.Self)
		st.mu.Lock()
		defer st.mu.Unlock()
		if err = t.sync(ctx, vm, st); err != nil {
			return
		}
		err = fn(ctx, vm, st)
	})
	return err
}

func liveDisk(st *vmState, key int32) (*diskState, error) {
	d := st.disks[key]
	if d == nil {
		return nil, errorf(http.StatusNotFound, "vm %s has no virtual disk with key %d", st.ref.Value, key)
	}
	return d, nil
}

func findDisk(vm *simulator.VirtualMachine, key int32) *types.VirtualDisk {
	for _, dev := range vm.Config.Hardware.Device {
		if disk, ok := dev.(*types.VirtualDisk); ok && disk.Key == key {
			return disk
		}
	}
	return nil
}

// stampChangeID copies the live disk's current changeId into its device backing.
func stampChangeID(ctx *simulator.Context, vm *simulator.VirtualMachine, d *diskState) {
	if disk := findDisk(vm, d.key); disk != nil {
		if b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok && b.ChangeId != d.changeID() {
			b.ChangeId = d.changeID()
			publishDevices(ctx, vm)
		}
	}
}

type writeOp struct {
	ext  Extent
	data []byte // nil: zeros
}

// apply performs one guest operation: all its writes are one change epoch.
func (t *tracker) apply(ctx *simulator.Context, vm *simulator.VirtualMachine, d *diskState, ops []writeOp) (*WriteResult, error) {
	for _, op := range ops {
		if op.ext.Offset < 0 || op.ext.Length < 0 || op.ext.Offset+op.ext.Length > d.capacity {
			return nil, errorf(http.StatusBadRequest, "write [%d, %d) is outside disk %d of %d bytes",
				op.ext.Offset, op.ext.Offset+op.ext.Length, d.key, d.capacity)
		}
	}
	f, err := os.OpenFile(d.flatPath, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if d.cbtUUID != "" {
		d.seq++
	}
	res := &WriteResult{Extents: make([]Extent, 0, len(ops))}
	var werr error
	for _, op := range ops {
		if op.ext.Length == 0 {
			continue
		}
		if op.data == nil {
			werr = zeroRange(f, op.ext.Offset, op.ext.Length)
		} else {
			_, werr = f.WriteAt(op.data, op.ext.Offset)
		}
		if werr != nil {
			break
		}
		d.recordWrite(t.blockSize, op.ext.Offset, op.ext.Length)
		res.Extents = append(res.Extents, op.ext)
		res.Bytes += op.ext.Length
	}
	stampChangeID(ctx, vm, d)
	res.ChangeID = d.changeID()
	if werr != nil {
		return nil, fmt.Errorf("write disk %d: %w", d.key, werr)
	}
	return res, nil
}

// Write writes explicit bytes at an offset of a live disk.
func (t *tracker) Write(vmID string, key int32, req WriteRequest) (res *WriteResult, err error) {
	err = t.withVM(vmID, func(ctx *simulator.Context, vm *simulator.VirtualMachine, st *vmState) error {
		d, err := liveDisk(st, key)
		if err != nil {
			return err
		}
		res, err = t.apply(ctx, vm, d, []writeOp{{ext: Extent{req.Offset, int64(len(req.Data))}, data: req.Data}})
		return err
	})
	return res, err
}

// Zero writes zeros over a range of a live disk.
func (t *tracker) Zero(vmID string, key int32, req ZeroRequest) (res *WriteResult, err error) {
	err = t.withVM(vmID, func(ctx *simulator.Context, vm *simulator.VirtualMachine, st *vmState) error {
		d, err := liveDisk(st, key)
		if err != nil {
			return err
		}
		if req.Length <= 0 {
			return errorf(http.StatusBadRequest, "length must be positive")
		}
		res, err = t.apply(ctx, vm, d, []writeOp{{ext: Extent{req.Offset, req.Length}}})
		return err
	})
	return res, err
}

// Fill writes generated data in a pattern.
func (t *tracker) Fill(vmID string, key int32, req FillRequest) (res *WriteResult, err error) {
	err = t.withVM(vmID, func(ctx *simulator.Context, vm *simulator.VirtualMachine, st *vmState) error {
		d, err := liveDisk(st, key)
		if err != nil {
			return err
		}
		exts, err := t.fillExtents(d.capacity, req)
		if err != nil {
			return err
		}
		var seed [32]byte
		binary.LittleEndian.PutUint64(seed[:8], req.Seed)
		gen := rand.NewChaCha8(seed)
		ops := make([]writeOp, len(exts))
		for i, e := range exts {
			buf := make([]byte, e.Length)
			_, _ = gen.Read(buf) // never fails
			ops[i] = writeOp{ext: e, data: buf}
		}
		res, err = t.apply(ctx, vm, d, ops)
		return err
	})
	return res, err
}

func (t *tracker) fillExtents(capacity int64, req FillRequest) ([]Extent, error) {
	if req.Count <= 0 || req.Count > 10_000_000 {
		return nil, errorf(http.StatusBadRequest, "count must be in 1..10000000")
	}
	if req.Size <= 0 || req.Size > maxWriteSize {
		return nil, errorf(http.StatusBadRequest, "size must be in 1..%d", maxWriteSize)
	}
	if req.Offset < 0 || req.Offset >= capacity {
		return nil, errorf(http.StatusBadRequest, "offset must be in [0, %d)", capacity)
	}
	exts := make([]Extent, 0, req.Count)
	switch req.Pattern {
	case "sequential":
		for i := range int64(req.Count) {
			exts = append(exts, Extent{req.Offset + i*req.Size, req.Size})
		}
	case "fragmented":
		stride := req.Stride
		if stride == 0 {
			stride = 2 * t.blockSize
		}
		if stride < req.Size {
			return nil, errorf(http.StatusBadRequest, "stride %d is smaller than size %d", stride, req.Size)
		}
		for i := range int64(req.Count) {
			exts = append(exts, Extent{req.Offset + i*stride, req.Size})
		}
	case "random":
		align := req.Align
		if align == 0 {
			align = 512
		}
		length := req.Length
		if length == 0 {
			length = capacity - req.Offset
		}
		if align <= 0 || length < req.Size || req.Offset+length > capacity {
			return nil, errorf(http.StatusBadRequest, "random writes of %d bytes do not fit [%d, %d) of a %d byte disk", req.Size, req.Offset, req.Offset+length, capacity)
		}
		slots := (length-req.Size)/align + 1
		rng := rand.New(rand.NewPCG(req.Seed, 0x5eed5e17d15c))
		for range req.Count {
			exts = append(exts, Extent{req.Offset + rng.Int64N(slots)*align, req.Size})
		}
	default:
		return nil, errorf(http.StatusBadRequest, "unknown pattern %q (want random, sequential or fragmented)", req.Pattern)
	}
	last := exts[len(exts)-1]
	if end := last.Offset + last.Length; end > capacity {
		return nil, errorf(http.StatusBadRequest, "pattern ends at %d, beyond the disk's %d bytes", end, capacity)
	}
	return exts, nil
}

// Resize grows a live disk. Like vSphere, it refuses while the VM has snapshots; it
// resets the disk's CBT.
func (t *tracker) Resize(vmID string, key int32, req ResizeRequest) (info *VMInfo, err error) {
	err = t.withVM(vmID, func(ctx *simulator.Context, vm *simulator.VirtualMachine, st *vmState) error {
		d, err := liveDisk(st, key)
		if err != nil {
			return err
		}
		if len(st.snaps) > 0 {
			return errorf(http.StatusConflict, "vm %s has snapshots: a disk with snapshots cannot be extended", vm.Name)
		}
		if req.Capacity <= d.capacity || req.Capacity%1024 != 0 {
			return errorf(http.StatusBadRequest, "new capacity %d must be larger than %d and a multiple of 1024", req.Capacity, d.capacity)
		}
		disk := findDisk(vm, key)
		disk.CapacityInBytes = req.Capacity
		disk.CapacityInKB = req.Capacity / 1024
		if err := t.sync(ctx, vm, st); err != nil {
			return err
		}
		publishDevices(ctx, vm)
		info = t.vmInfo(vm, st)
		return nil
	})
	return info, err
}

// SetCBT switches change tracking on or off (as ReconfigVM_Task with
// changeTrackingEnabled would) and/or resets it.
func (t *tracker) SetCBT(vmID string, req CBTRequest) (info *VMInfo, err error) {
	err = t.withVM(vmID, func(ctx *simulator.Context, vm *simulator.VirtualMachine, st *vmState) error {
		if req.Enabled == nil && !req.Reset && req.Unsorted == nil && req.QueryDelayMs == nil {
			return errorf(http.StatusBadRequest, "nothing to do: set enabled, reset, unsorted and/or query_delay_ms")
		}
		if req.QueryDelayMs != nil && *req.QueryDelayMs < 0 {
			return errorf(http.StatusBadRequest, "query_delay_ms %d is negative", *req.QueryDelayMs)
		}
		if req.Enabled != nil {
			vm.Config.ChangeTrackingEnabled = types.NewBool(*req.Enabled)
			if err := t.sync(ctx, vm, st); err != nil {
				return err
			}
		}
		if req.Reset {
			if !st.cbt {
				return errorf(http.StatusConflict, "change tracking is off on vm %s", vm.Name)
			}
			for key, d := range st.disks {
				if req.Disk != nil && *req.Disk != key {
					continue
				}
				d.startCBT(t.nblocks(d.capacity))
				stampChangeID(ctx, vm, d)
			}
			if req.Disk != nil && st.disks[*req.Disk] == nil {
				return errorf(http.StatusNotFound, "vm %s has no virtual disk with key %d", vm.Name, *req.Disk)
			}
		}
		if req.Unsorted != nil {
			st.unsorted = *req.Unsorted
		}
		if req.QueryDelayMs != nil {
			st.queryDelayMs.Store(*req.QueryDelayMs)
		}
		info = t.vmInfo(vm, st)
		return nil
	})
	return info, err
}

// Checksum hashes a live disk over its capacity.
func (t *tracker) Checksum(vmID string, key int32) (res *ChecksumResult, err error) {
	err = t.withVM(vmID, func(_ *simulator.Context, _ *simulator.VirtualMachine, st *vmState) error {
		d, err := liveDisk(st, key)
		if err != nil {
			return err
		}
		sum, err := fileSHA256(d.flatPath, d.capacity)
		if err != nil {
			return err
		}
		res = &ChecksumResult{SHA256: sum, Capacity: d.capacity, FlatFile: d.flatPath, ChangeID: d.changeID()}
		return nil
	})
	return res, err
}

// SnapshotChecksum hashes a disk as frozen by a snapshot (moref value or name).
func (t *tracker) SnapshotChecksum(vmID, snapID string, key int32) (res *ChecksumResult, err error) {
	err = t.withVM(vmID, func(_ *simulator.Context, vm *simulator.VirtualMachine, st *vmState) error {
		s, err := findSnap(vm, st, snapID)
		if err != nil {
			return err
		}
		fd := s.disks[key]
		if fd == nil {
			return errorf(http.StatusNotFound, "snapshot %s has no virtual disk with key %d", snapID, key)
		}
		if fd.err != nil {
			return fmt.Errorf("snapshot %s disk %d was not frozen: %w", snapID, key, fd.err)
		}
		sum, err := fileSHA256(fd.flatPath, fd.capacity)
		if err != nil {
			return err
		}
		res = &ChecksumResult{SHA256: sum, Capacity: fd.capacity, FlatFile: fd.flatPath, ChangeID: fd.changeID()}
		return nil
	})
	return res, err
}

func findSnap(vm *simulator.VirtualMachine, st *vmState, id string) (*snapState, error) {
	var found []*snapState
	for ref, s := range st.snaps {
		name := ""
		if vm.Snapshot != nil {
			name, _ = findSnapshotName(vm.Snapshot.RootSnapshotList, ref)
		}
		if ref.Value == id || name == id {
			found = append(found, s)
		}
	}
	switch len(found) {
	case 0:
		return nil, errorf(http.StatusNotFound, "vm %s has no snapshot %q", vm.Name, id)
	case 1:
		return found[0], nil
	default:
		return nil, errorf(http.StatusConflict, "vm %s has %d snapshots named %q: use the moref", vm.Name, len(found), id)
	}
}

// VM describes one VM.
func (t *tracker) VM(vmID string) (info *VMInfo, err error) {
	err = t.withVM(vmID, func(_ *simulator.Context, vm *simulator.VirtualMachine, st *vmState) error {
		info = t.vmInfo(vm, st)
		return nil
	})
	return info, err
}

// VMs describes every VM, sorted by name.
func (t *tracker) VMs() ([]VMInfo, error) {
	var refs []string
	for _, e := range t.reg.All("VirtualMachine") {
		refs = append(refs, e.Reference().Value)
	}
	var out []VMInfo
	for _, ref := range refs {
		info, err := t.VM(ref)
		if err != nil {
			var ae *apiError
			if errors.As(err, &ae) && ae.status == http.StatusNotFound {
				continue // removed meanwhile
			}
			return nil, err
		}
		out = append(out, *info)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

func (t *tracker) vmInfo(vm *simulator.VirtualMachine, st *vmState) *VMInfo {
	info := &VMInfo{
		Name:          vm.Name,
		Moref:         vm.Self.Value,
		PowerState:    string(vm.Runtime.PowerState),
		CBT:           st.cbt,
		UnsortedPages: st.unsorted,
		QueryDelayMs:  st.queryDelayMs.Load(),
		QueriesHeld:   int(st.queriesHeld.Load()),
		Disks:         []DiskInfo{},
		Snapshots:     []SnapshotInfo{},
	}
	if vm.Config != nil {
		info.InstanceUUID = vm.Config.InstanceUuid
		info.UUID = vm.Config.Uuid
	}
	for _, d := range st.disks {
		info.Disks = append(info.Disks, DiskInfo{Key: d.key, FileName: d.fileName, FlatFile: d.flatPath, Capacity: d.capacity, ChangeID: d.changeID()})
	}
	sort.Slice(info.Disks, func(i, j int) bool { return info.Disks[i].Key < info.Disks[j].Key })
	for ref, s := range st.snaps {
		si := SnapshotInfo{Moref: ref.Value, Disks: []DiskInfo{}}
		if vm.Snapshot != nil {
			si.Name, _ = findSnapshotName(vm.Snapshot.RootSnapshotList, ref)
		}
		for _, fd := range s.disks {
			di := DiskInfo{Key: fd.key, FileName: fd.fileName, FlatFile: fd.flatPath, Capacity: fd.capacity, ChangeID: fd.changeID()}
			if fd.err != nil {
				di.Error = fd.err.Error()
			}
			si.Disks = append(si.Disks, di)
		}
		sort.Slice(si.Disks, func(i, j int) bool { return si.Disks[i].Key < si.Disks[j].Key })
		info.Snapshots = append(info.Snapshots, si)
	}
	sort.Slice(info.Snapshots, func(i, j int) bool {
		return snapOrder(info.Snapshots[i].Moref) < snapOrder(info.Snapshots[j].Moref)
	})
	return info
}

// snapOrder sorts "snapshot-7" before "snapshot-12" (creation order).
func snapOrder(moref string) int {
	n := 0
	for _, c := range moref {
		if c >= '0' && c <= '9' {
			n = n*10 + int(c-'0')
		}
	}
	return n
}
