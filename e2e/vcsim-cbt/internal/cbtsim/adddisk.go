package cbtsim

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"slices"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/types"
)

// scsiUnits is how many units one SCSI controller has; unit 7 is the controller's own.
const scsiUnits = 16

// diskDevice is the config spec adding a thin flat disk as vSphere names and labels it:
// device key, unit on the paravirtual SCSI controller, "Hard disk <n>", datastore file, size.
func diskDevice(key, unit int32, n int, file string, size int64) *types.VirtualDeviceConfigSpec {
	return &types.VirtualDeviceConfigSpec{
		Operation:     types.VirtualDeviceConfigSpecOperationAdd,
		FileOperation: types.VirtualDeviceConfigSpecFileOperationCreate,
		Device: &types.VirtualDisk{
			VirtualDevice: types.VirtualDevice{
				Key:           key,
				DeviceInfo:    &types.Description{Label: fmt.Sprintf("Hard disk %d", n)},
				ControllerKey: ControllerKey,
				UnitNumber:    &unit,
				Backing: &types.VirtualDiskFlatVer2BackingInfo{
					VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{FileName: file},
					DiskMode:                     string(types.VirtualDiskModePersistent),
					ThinProvisioned:              types.NewBool(true),
				},
			},
			CapacityInBytes: size,
			CapacityInKB:    size / 1024,
		},
	}
}

// diskFileName is the datastore path of a VM's disk j > 0: "[LocalDS_0] vm/vm_j.vmdk".
func diskFileName(vm string, j int) string {
	return fmt.Sprintf("[%s] %s/%s_%d.vmdk", DatastoreName, vm, vm, j)
}

// AddDisk adds a thin flat disk to a live VM the way a vSphere client does, with
// ReconfigVM_Task (device "add", file operation "create"), so the new disk is like those the
// VM was created with: its flat file in the VM's directory, frozen by snapshots, tracked by CBT
// (a new uuid) when the VM has CBT on, hashed by the checksum calls. The device key is one past
// the VM's highest disk key; the unit the controller's first free one. Allowed with snapshots,
// as on vSphere (they do not have the new disk).
func (s *Server) AddDisk(ctx context.Context, vmID string, req AddDiskRequest) (*DiskInfo, error) {
	if req.Capacity < 1<<20 || req.Capacity%1024 != 0 {
		return nil, errorf(http.StatusBadRequest, "capacity %d: must be at least 1 MiB and a multiple of 1 KiB", req.Capacity)
	}
	s.adding.Lock()
	defer s.adding.Unlock()
	vm, err := s.tracker.findVM(vmID)
	if err != nil {
		return nil, err
	}
	var spec *types.VirtualDeviceConfigSpec
	s.tracker.newContext().WithLock(vm, func() { spec, err = s.tracker.nextDisk(vm, req.Capacity) })
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	c, err := vim25.NewClient(ctx, s.model.Service)
	if err != nil {
		return nil, err
	}
	task, err := object.NewVirtualMachine(c, vm.Self).Reconfigure(ctx, types.VirtualMachineConfigSpec{
		DeviceChange: []types.BaseVirtualDeviceConfigSpec{spec},
	})
	if err == nil {
		err = task.Wait(ctx)
	}
	if err != nil {
		return nil, fmt.Errorf("add a disk to vm %s: %w", vm.Name, err)
	}
	info, err := s.tracker.VM(vm.Self.Value) // syncs: the flat file exists, CBT tracks it
	if err != nil {
		return nil, err
	}
	key := spec.Device.GetVirtualDevice().Key
	for _, d := range info.Disks {
		if d.Key == key {
			return &d, nil
		}
	}
	return nil, fmt.Errorf("vm %s has no disk %d after adding it", vm.Name, key)
}

// nextDisk picks the new disk's key, unit and file. The caller holds the VM's lock.
func (t *tracker) nextDisk(vm *simulator.VirtualMachine, capacity int64) (*types.VirtualDeviceConfigSpec, error) {
	var keys, units []int32
	files := map[string]bool{}
	disks := 0
	for _, dev := range vm.Config.Hardware.Device {
		d := dev.GetVirtualDevice()
		keys = append(keys, d.Key)
		if d.ControllerKey == ControllerKey && d.UnitNumber != nil {
			units = append(units, *d.UnitNumber)
		}
		if disk, ok := dev.(*types.VirtualDisk); ok {
			disks++
			if b, ok := disk.Backing.(types.BaseVirtualDeviceFileBackingInfo); ok {
				files[b.GetVirtualDeviceFileBackingInfo().FileName] = true
			}
		}
	}
	if disks >= MaxDisksPerVM {
		return nil, errorf(http.StatusConflict, "vm %s has %d disks, as many as its SCSI controller takes", vm.Name, disks)
	}
	key := FirstDiskKey
	for _, dev := range vm.Config.Hardware.Device {
		if _, ok := dev.(*types.VirtualDisk); ok {
			key = max(key, dev.GetVirtualDevice().Key+1)
		}
	}
	for slices.Contains(keys, key) {
		key++
	}
	unit := int32(0)
	for unit == 7 || slices.Contains(units, unit) {
		unit++
	}
	if unit >= scsiUnits {
		return nil, errorf(http.StatusConflict, "vm %s: its SCSI controller has no free unit", vm.Name)
	}
	// A name no disk uses and no file has (a removed disk's file may remain).
	for j := 1; ; j++ {
		file := diskFileName(vm.Name, j)
		if files[file] {
			continue
		}
		desc, flat, err := t.resolve(file)
		if err != nil {
			return nil, err
		}
		if exists(desc) || exists(flat) {
			continue
		}
		return diskDevice(key, unit, disks+1, file, capacity), nil
	}
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
