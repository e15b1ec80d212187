package cbtsim_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25/types"

	"sendense.io/e2e/vcsim-cbt/internal/cbtsim"
)

// What a restore does: create a VM whose disks are new files (CreateVM_Task), fill their
// flat files through the datastore (the agent's nfs transport), add a disk later
// (ReconfigVM_Task), then back the VM up.

// Temporary keys of a client's config spec; the simulator assigns the real ones.
const (
	newControllerKey int32 = -100
	newDiskKey       int32 = -1
)

// newDisk is the config spec of a client adding a thin flat disk at file on the controller:
// capacity in bytes, in KB, or both, as clients variously give it.
func newDisk(key, controller, unit int32, file string, bytes, kb int64) *types.VirtualDeviceConfigSpec {
	return &types.VirtualDeviceConfigSpec{
		Operation:     types.VirtualDeviceConfigSpecOperationAdd,
		FileOperation: types.VirtualDeviceConfigSpecFileOperationCreate,
		Device: &types.VirtualDisk{
			VirtualDevice: types.VirtualDevice{
				Key:           key,
				ControllerKey: controller,
				UnitNumber:    &unit,
				Backing: &types.VirtualDiskFlatVer2BackingInfo{
					VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{FileName: file},
					DiskMode:                     string(types.VirtualDiskModePersistent),
					ThinProvisioned:              types.NewBool(true),
				},
			},
			CapacityInBytes: bytes,
			CapacityInKB:    kb,
		},
	}
}

// restoreSpec is a new VM with a paravirtual SCSI controller and the given disks (on it).
func restoreSpec(name string, disks ...*types.VirtualDeviceConfigSpec) types.VirtualMachineConfigSpec {
	spec := types.VirtualMachineConfigSpec{
		Name:     name,
		GuestId:  string(types.VirtualMachineGuestOsIdentifierOtherGuest64),
		NumCPUs:  1,
		MemoryMB: 128,
		Files:    &types.VirtualMachineFileInfo{VmPathName: "[" + cbtsim.DatastoreName + "]"},
		DeviceChange: []types.BaseVirtualDeviceConfigSpec{&types.VirtualDeviceConfigSpec{
			Operation: types.VirtualDeviceConfigSpecOperationAdd,
			Device: &types.ParaVirtualSCSIController{VirtualSCSIController: types.VirtualSCSIController{
				VirtualController: types.VirtualController{VirtualDevice: types.VirtualDevice{Key: newControllerKey}},
				SharedBus:         types.VirtualSCSISharingNoSharing,
			}},
		}},
	}
	for _, d := range disks {
		spec.DeviceChange = append(spec.DeviceChange, d)
	}
	return spec
}

// placement is where new VMs go: the datacenter's VM folder and the cluster's pool.
func (e *env) placement() (*object.Folder, *object.ResourcePool) {
	e.t.Helper()
	finder := find.NewFinder(e.c, false)
	dc, err := finder.Datacenter(e.ctx, cbtsim.DatacenterName)
	if err != nil {
		e.t.Fatal(err)
	}
	finder.SetDatacenter(dc)
	folders, err := dc.Folders(e.ctx)
	if err != nil {
		e.t.Fatal(err)
	}
	cluster, err := finder.ClusterComputeResource(e.ctx, cbtsim.ClusterName)
	if err != nil {
		e.t.Fatal(err)
	}
	pool, err := cluster.ResourcePool(e.ctx)
	if err != nil {
		e.t.Fatal(err)
	}
	return folders.VmFolder, pool
}

// createVM runs CreateVM_Task in the cluster's pool and returns an env on the new VM.
func (e *env) createVM(spec types.VirtualMachineConfigSpec) *env {
	e.t.Helper()
	folder, pool := e.placement()
	task, err := folder.CreateVM(e.ctx, spec, pool, nil)
	if err != nil {
		e.t.Fatalf("create %s: %v", spec.Name, err)
	}
	res, err := task.WaitForResult(e.ctx)
	if err != nil {
		e.t.Fatalf("create %s: %v", spec.Name, err)
	}
	on := *e
	on.vm = object.NewVirtualMachine(e.c, res.Result.(types.ManagedObjectReference))
	return &on
}

// controllerKey is the key the simulator gave the VM's SCSI controller.
func (e *env) controllerKey() int32 {
	e.t.Helper()
	devices, err := e.vm.Device(e.ctx)
	if err != nil {
		e.t.Fatal(err)
	}
	ctrl, err := devices.FindSCSIController("")
	if err != nil {
		e.t.Fatal(err)
	}
	return ctrl.Key
}

// diskByFile is the VM's disk whose backing names file.
func (e *env) diskByFile(file string) *types.VirtualDisk {
	e.t.Helper()
	for _, d := range e.disks(e.vm.Reference()) {
		if backing(d).FileName == file {
			return d
		}
	}
	e.t.Fatalf("%s has no disk with file %q", e.vm.Reference().Value, file)
	return nil
}

// expectEmptyFlatFile checks what the agent's nfs transport finds for a new disk: the flat
// file the documented mapping names, exactly capacity bytes, a hole (nothing allocated).
func (e *env) expectEmptyFlatFile(d *types.VirtualDisk, capacity int64) {
	e.t.Helper()
	if got := diskCapacity(d); got != capacity || d.CapacityInKB != capacity/1024 {
		e.t.Fatalf("disk %d: capacityInBytes %d, capacityInKB %d; want %d bytes", d.Key, d.CapacityInBytes, d.CapacityInKB, capacity)
	}
	flat := e.flatPath(backing(d).FileName)
	st, err := os.Stat(flat)
	if err != nil {
		e.t.Fatalf("disk %d: flat file: %v", d.Key, err)
	}
	if st.Size() != capacity {
		e.t.Fatalf("disk %d: %s is %d bytes, want %d", d.Key, flat, st.Size(), capacity)
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok && sys.Blocks != 0 {
		e.t.Fatalf("disk %d: %s has %d blocks allocated, want a hole", d.Key, flat, sys.Blocks)
	}
	desc, err := os.ReadFile(e.descPath(backing(d).FileName))
	if err != nil || !bytes.Contains(desc, []byte(`"`+filepath.Base(flat)+`"`)) {
		e.t.Fatalf("disk %d: descriptor does not name %s: %v\n%s", d.Key, filepath.Base(flat), err, desc)
	}
}

// expectChecksum checks the control API's live checksum of a disk against an image.
func (e *env) expectChecksum(vm string, key int32, image []byte) {
	e.t.Helper()
	got, err := e.ctl.Checksum(e.ctx, vm, key)
	if err != nil {
		e.t.Fatalf("checksum of disk %d: %v", key, err)
	}
	sum := sha256.Sum256(image)
	if got.SHA256 != hex.EncodeToString(sum[:]) || got.Capacity != int64(len(image)) {
		e.t.Fatalf("checksum of disk %d: %+v, want sha256 %x of %d bytes", key, got, sum, len(image))
	}
}

// writeBehind writes data into a flat file directly, as the agent's nfs transport does
// when it restores a disk: no truncation, no control API.
func writeBehind(t *testing.T, flat string, off int64, data []byte) {
	t.Helper()
	f, err := os.OpenFile(flat, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(data, off); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// A VM created with new disks has their flat files, at capacity, as the nfs transport finds
// them; bytes restored into them are what the checksum API hashes; a disk added later is
// the same; and the VM is backed up like any other: CBT, snapshots, "*" (which counts the
// restored data as allocated, though no changeId covers it), frozen checksums.
func TestCreateVMMakesDisksARestoreFills(t *testing.T) {
	e := start(t, nil)
	bs := e.info.BlockSize
	const name = "restored"
	files := []string{"[LocalDS_0] restored/restored.vmdk", "[LocalDS_0] restored/restored_1.vmdk", "[LocalDS_0] restored/restored_2.vmdk"}
	caps := []int64{24 * mib, 40 * mib, 8 * mib}
	r := e.createVM(restoreSpec(name,
		newDisk(newDiskKey, newControllerKey, 0, files[0], 0, caps[0]/1024), // capacityInKB only
		newDisk(newDiskKey-1, newControllerKey, 1, files[1], caps[1], 0),    // capacityInBytes only
	))

	disks := r.disks(r.vm.Reference())
	if len(disks) != 2 {
		t.Fatalf("%d disks, want 2", len(disks))
	}
	d0, d1 := r.diskByFile(files[0]), r.diskByFile(files[1])
	r.expectEmptyFlatFile(d0, caps[0])
	r.expectEmptyFlatFile(d1, caps[1])
	if backing(d0).ChangeId != "" || backing(d1).ChangeId != "" {
		t.Fatalf("changeIds without CBT: %q %q", backing(d0).ChangeId, backing(d1).ChangeId)
	}
	info, err := e.ctl.VM(e.ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	if info.Moref != r.vm.Reference().Value || len(info.Disks) != 2 || info.CBT {
		t.Fatalf("control API's view of the new VM: %+v", info)
	}
	for i, d := range []*types.VirtualDisk{d0, d1} {
		listed := info.Disks[i]
		if listed.Key != d.Key || listed.FileName != files[i] || listed.FlatFile != e.flatPath(files[i]) || listed.Capacity != caps[i] {
			t.Fatalf("disk %d listed as %+v", d.Key, listed)
		}
	}

	// The restore: data written straight into the first disk's flat file.
	image0 := make([]byte, caps[0])
	restored := []cbtsim.Extent{{Offset: 0, Length: 4096}, {Offset: 3*mib + 512, Length: 200_000}, {Offset: caps[0] - 1000, Length: 1000}}
	for i, x := range restored {
		data := bytes.Repeat([]byte{byte(0xA0 + i)}, int(x.Length))
		copy(image0[x.Offset:], data)
		writeBehind(t, e.flatPath(files[0]), x.Offset, data)
	}
	e.expectChecksum(name, d0.Key, image0)
	e.expectChecksum(name, d1.Key, make([]byte, caps[1]))
	if _, err := e.ctl.Checksum(e.ctx, name, 2999); err == nil || !strings.Contains(err.Error(), "404") {
		t.Fatalf("checksum of a disk the VM does not have: %v", err)
	}

	// A third disk, added by a client's ReconfigVM_Task.
	r.reconfigure(types.VirtualMachineConfigSpec{DeviceChange: []types.BaseVirtualDeviceConfigSpec{
		newDisk(newDiskKey, r.controllerKey(), 2, files[2], caps[2], caps[2]/1024),
	}})
	d2 := r.diskByFile(files[2])
	r.expectEmptyFlatFile(d2, caps[2])
	if info, err = e.ctl.VM(e.ctx, name); err != nil || len(info.Disks) != 3 || info.Disks[2].Key != d2.Key || info.Disks[2].FlatFile != e.flatPath(files[2]) {
		t.Fatalf("control API's view after adding a disk: %+v %v", info, err)
	}
	e.expectChecksum(name, d2.Key, make([]byte, caps[2]))

	// Backed up like any VM: CBT on, a guest write, a snapshot.
	r.setCBT(true)
	ids := map[int32]string{}
	for _, d := range []*types.VirtualDisk{d0, d1, d2} {
		ids[d.Key] = r.changeID(r.vm.Reference(), d.Key)
		cbtUUID(t, ids[d.Key])
	}
	w := cbtsim.Extent{Offset: 1*mib + 7, Length: 3 * bs}
	wdata := bytes.Repeat([]byte{0x3C}, int(w.Length))
	if _, err := e.ctl.Write(e.ctx, name, d2.Key, w.Offset, wdata); err != nil {
		t.Fatal(err)
	}
	image2 := make([]byte, caps[2])
	copy(image2[w.Offset:], wdata)
	snap := r.snapshot("backup")

	got, _ := r.queryAll(snap, d0.Key, 0, "*")
	sameExtents(t, `"*" of the restored disk`, got, blocks(restored, bs, caps[0]))
	got, _ = r.queryAll(snap, d0.Key, 0, ids[d0.Key])
	sameExtents(t, "changes of the restored disk since CBT was enabled", got, nil)
	got, _ = r.queryAll(snap, d1.Key, 0, "*")
	sameExtents(t, `"*" of the untouched disk`, got, nil)
	got, _ = r.queryAll(snap, d2.Key, 0, "*")
	sameExtents(t, `"*" of the added disk`, got, blocks([]cbtsim.Extent{w}, bs, caps[2]))
	got, _ = r.queryAll(snap, d2.Key, 0, ids[d2.Key])
	sameExtents(t, "changes of the added disk since CBT was enabled", got, blocks([]cbtsim.Extent{w}, bs, caps[2]))

	for key, image := range map[int32][]byte{d0.Key: image0, d1.Key: make([]byte, caps[1]), d2.Key: image2} {
		frozen, err := e.ctl.SnapshotChecksum(e.ctx, name, "backup", key)
		sum := sha256.Sum256(image)
		if err != nil || frozen.SHA256 != hex.EncodeToString(sum[:]) {
			t.Fatalf("snapshot checksum of disk %d: %+v %v", key, frozen, err)
		}
	}
	e.expectChecksum(name, d2.Key, image2)
}

// CBT asked for in CreateVM_Task's spec is on when the task completes, a disk named only by
// its datastore gets a file of its own, and Destroy_Task takes the VM's files with it.
func TestCreateVMWithCBTAndDestroy(t *testing.T) {
	e := start(t, nil)
	bs := e.info.BlockSize
	const name = "restored-cbt"
	spec := restoreSpec(name,
		newDisk(newDiskKey, newControllerKey, 0, "[LocalDS_0] restored-cbt/restored-cbt.vmdk", 16*mib, 16*mib/1024),
		newDisk(newDiskKey-1, newControllerKey, 1, "[LocalDS_0]", 4*mib, 4*mib/1024), // the simulator names it
	)
	spec.ChangeTrackingEnabled = types.NewBool(true)
	r := e.createVM(spec)

	// Read before any control API call: the task itself leaves the disks ready.
	disks := r.disks(r.vm.Reference())
	if len(disks) != 2 {
		t.Fatalf("%d disks, want 2", len(disks))
	}
	var keys []int32
	for key, d := range disks {
		file := backing(d).FileName
		if !strings.HasPrefix(file, "[LocalDS_0] restored-cbt/") || !strings.HasSuffix(file, ".vmdk") {
			t.Fatalf("disk %d file %q: not in the VM's directory", key, file)
		}
		r.expectEmptyFlatFile(d, diskCapacity(d))
		cbtUUID(t, backing(d).ChangeId)
		keys = append(keys, key)
	}
	key := r.diskByFile("[LocalDS_0] restored-cbt/restored-cbt.vmdk").Key
	before := r.changeID(r.vm.Reference(), key)

	w := cbtsim.Extent{Offset: 5 * mib, Length: 10_000}
	res, err := e.ctl.Write(e.ctx, name, key, w.Offset, bytes.Repeat([]byte{1}, int(w.Length)))
	if err != nil {
		t.Fatal(err)
	}
	if res.ChangeID == before || cbtUUID(t, res.ChangeID) != cbtUUID(t, before) {
		t.Fatalf("changeId after a write %q, before %q", res.ChangeID, before)
	}
	snap := r.snapshot("backup")
	want := blocks([]cbtsim.Extent{w}, bs, 16*mib)
	for _, id := range []string{"*", before} {
		got, _ := r.queryAll(snap, key, 0, id)
		sameExtents(t, "areas since "+id, got, want)
	}

	// Destroy_Task (the VM powered off, as vSphere requires) removes its directory, and the
	// control API forgets it.
	dir := filepath.Join(e.info.Datastores[cbtsim.DatastoreName], name)
	if _, err := os.Stat(dir); err != nil {
		t.Fatal(err)
	}
	task, err := r.vm.Destroy(e.ctx)
	if err == nil {
		err = task.Wait(e.ctx)
	}
	if err != nil {
		t.Fatalf("destroy: %v", err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%s after destroy: %v", dir, err)
	}
	if _, err := e.ctl.VM(e.ctx, name); err == nil || !strings.Contains(err.Error(), "404") {
		t.Fatalf("the destroyed VM in the control API: %v", err)
	}
	// The simulator's own VM is untouched.
	if _, err := e.ctl.Checksum(e.ctx, e.vmName(), cbtsim.FirstDiskKey); err != nil {
		t.Fatal(err)
	}
}

// A clone's disks are new files too: flat files of the source's capacities, empty.
func TestCloneVMGetsEmptyFlatFiles(t *testing.T) {
	e := start(t, func(c *cbtsim.Config) { c.DiskSizes = []int64{8 * mib, 12 * mib} })
	if _, err := e.ctl.Write(e.ctx, e.vmName(), cbtsim.FirstDiskKey, 0, []byte("source data")); err != nil {
		t.Fatal(err)
	}
	folder, _ := e.placement()
	task, err := e.vm.Clone(e.ctx, folder, "clone", types.VirtualMachineCloneSpec{})
	if err != nil {
		t.Fatal(err)
	}
	res, err := task.WaitForResult(e.ctx)
	if err != nil {
		t.Fatalf("clone: %v", err)
	}
	c := *e
	c.vm = object.NewVirtualMachine(e.c, res.Result.(types.ManagedObjectReference))
	disks := c.disks(c.vm.Reference())
	if len(disks) != 2 {
		t.Fatalf("the clone has %d disks, want 2", len(disks))
	}
	caps := map[int64]bool{}
	for _, d := range disks {
		if !strings.HasPrefix(backing(d).FileName, "[LocalDS_0] clone/") {
			t.Fatalf("clone disk %d at %q", d.Key, backing(d).FileName)
		}
		c.expectEmptyFlatFile(d, diskCapacity(d))
		caps[diskCapacity(d)] = true
		c.expectChecksum("clone", d.Key, make([]byte, diskCapacity(d)))
	}
	if !caps[8*mib] || !caps[12*mib] {
		t.Fatalf("clone capacities %v", caps)
	}
}
