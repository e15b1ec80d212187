package cbtsim

import (
	"cmp"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// cbtMethods implements the VirtualMachine methods the simulator lacks.
//
// It cannot simply wrap *simulator.VirtualMachine and replace the VM in the registry
// (the approach of the simulator's example_extend_test.go): the simulator's own code
// type-asserts registry entries to *simulator.VirtualMachine (CreateSnapshot,
// RemoveSnapshot, ...) and panics on a wrapper. Nor can the registry's Handler just
// return a wrapper: for a logged-in session the simulator looks the target up again
// (Session.Get falls back to the registry) and that lookup wins. So the Handler
// re-addresses the call: it points the method's target at this one object, registered
// under a reference of its own; the request body still names the VM (req.This).
//
// Registry entries must start with an embedded mo type (the simulator's SearchIndex,
// for one, inspects every entry), hence mo.ExtensibleManagedObject, which also provides
// Self and Reference().
type cbtMethods struct {
	mo.ExtensibleManagedObject
	t *tracker
}

var cbtMethodsRef = types.ManagedObjectReference{Type: "SendenseCBTMethods", Value: "cbt-methods"}

// install registers the tracker's hooks and methods in the registry.
func (t *tracker) install() {
	t.reg.AddHandler(t)
	methods := &cbtMethods{ExtensibleManagedObject: mo.ExtensibleManagedObject{Self: cbtMethodsRef}, t: t}
	t.reg.Put(methods)
	next := t.reg.Handler
	t.reg.Handler = func(ctx *simulator.Context, m *simulator.Method) (mo.Reference, types.BaseMethodFault) {
		if m.This.Type == "VirtualMachine" && m.Name == "QueryChangedDiskAreas" {
			if _, ok := ctx.Map.Get(m.This).(*simulator.VirtualMachine); ok {
				m.This = cbtMethodsRef
				return methods, nil
			}
		}
		if next != nil {
			return next(ctx, m)
		}
		return nil, nil
	}
}

// localized messages as vCenter words them
func invalidArgument(property string) *soap.Fault {
	return simulator.Fault("A specified parameter was not correct: "+property, &types.InvalidArgument{InvalidProperty: property})
}

func fileFault(file string) *soap.Fault {
	return simulator.Fault("Error caused by file "+file, &types.FileFault{File: file})
}

// QueryChangedDiskAreas implements VirtualMachine.QueryChangedDiskAreas.
//
// Faults, in the order they are checked:
//   - snapshot unset: InvalidArgument(invalidProperty "snapshot")
//   - snapshot not in the inventory: ManagedObjectNotFound
//   - snapshot of another VM: InvalidArgument("snapshot")
//   - CBT off on the VM now: FileFault (file = the disk's descriptor)
//   - deviceKey not a virtual disk of the snapshot: InvalidArgument("deviceKey")
//   - the snapshot was taken with CBT off (its disk has no changeId) or freezing it
//     failed: FileFault
//   - startOffset < 0 or >= the disk's capacity: InvalidArgument("startOffset")
//   - changeId malformed, of another CBT epoch (uuid differs: CBT reset, disk resized or
//     recreated) or ahead of the snapshot: InvalidArgument("changeId")
func (m *cbtMethods) QueryChangedDiskAreas(ctx *simulator.Context, req *types.QueryChangedDiskAreas) soap.HasFault {
	body := &methods.QueryChangedDiskAreasBody{}
	vm, ok := ctx.Map.Get(req.This).(*simulator.VirtualMachine)
	if !ok {
		body.Fault_ = managedObjectNotFound(req.This)
		return body
	}
	m.t.holdQuery(m.t.state(vm.Self))
	var info *types.DiskChangeInfo
	var fault *soap.Fault
	ctx.WithLock(vm, func() {
		// recovered here, inside the lock, so that a bug never leaves the VM locked
		if f := m.t.panics.recoverCall("QueryChangedDiskAreas on "+vm.Self.Value, func() { info, fault = m.t.query(ctx, vm, req) }); f != nil {
			fault = simulator.Fault("A general system error occurred: "+f.Reason, f)
		}
	})
	if fault != nil {
		body.Fault_ = fault
		return body
	}
	body.Res = &types.QueryChangedDiskAreasResponse{Returnval: *info}
	return body
}

// holdQuery waits out the VM's query delay (CBTRequest.QueryDelayMs), holding no lock, so
// that the control API and other calls go on meanwhile. The delay is read again as it
// passes: lowering it releases the calls already held.
func (t *tracker) holdQuery(st *vmState) {
	if st.queryDelayMs.Load() <= 0 {
		return
	}
	st.queriesHeld.Add(1)
	defer st.queriesHeld.Add(-1)
	start := time.Now()
	for time.Since(start) < time.Duration(st.queryDelayMs.Load())*time.Millisecond {
		time.Sleep(50 * time.Millisecond)
	}
}

func (t *tracker) query(ctx *simulator.Context, vm *simulator.VirtualMachine, req *types.QueryChangedDiskAreas) (*types.DiskChangeInfo, *soap.Fault) {
	if req.Snapshot == nil || req.Snapshot.Value == "" {
		return nil, invalidArgument("snapshot")
	}
	if ctx.Map.Get(*req.Snapshot) == nil {
		return nil, managedObjectNotFound(*req.Snapshot)
	}
	st := t.state(vm.Self)
	st.mu.Lock()
	defer st.mu.Unlock()
	if err := t.sync(ctx, vm, st); err != nil {
		t.logf("vcsim-cbt: sync %s: %v", vm.Self.Value, err)
	}
	snap, ok := st.snaps[*req.Snapshot]
	if !ok {
		return nil, invalidArgument("snapshot")
	}
	if !st.cbt {
		file := ""
		if d := st.disks[req.DeviceKey]; d != nil {
			file = d.fileName
		}
		return nil, fileFault(file)
	}
	fd, ok := snap.disks[req.DeviceKey]
	if !ok {
		return nil, invalidArgument("deviceKey")
	}
	if fd.err != nil || fd.cbtUUID == "" {
		return nil, fileFault(fd.fileName)
	}
	if req.StartOffset < 0 || req.StartOffset >= fd.capacity {
		return nil, invalidArgument("startOffset")
	}
	var changed func(b int64) bool
	if req.ChangeId == "*" {
		changed = func(b int64) bool { return fd.written[b] }
	} else {
		since, ok := parseChangeID(req.ChangeId, fd.cbtUUID)
		if !ok || since > fd.seq {
			return nil, invalidArgument("changeId")
		}
		changed = func(b int64) bool { return fd.lastWrite[b] > since }
	}
	areas, length := changedAreas(fd.capacity, t.blockSize, req.StartOffset, t.pageSize, changed)
	if st.unsorted {
		unsort(areas, req.StartOffset)
	}
	return &types.DiskChangeInfo{StartOffset: req.StartOffset, Length: length, ChangedArea: areas}, nil
}

// parseChangeID returns the sequence of "<uuid>/<seq>" if uuid is the expected one.
func parseChangeID(id, wantUUID string) (uint64, bool) {
	i := strings.LastIndexByte(id, '/')
	if i < 0 || id[:i] != wantUUID {
		return 0, false
	}
	seq, err := strconv.ParseUint(id[i+1:], 10, 64)
	if err != nil {
		return 0, false
	}
	return seq, true
}

// changedAreas walks the blocks from start and merges runs of changed blocks into areas
// clipped to [start, capacity). It returns at most limit areas; the length covers the
// disk up to the start of the first area left out (or to the end of the disk), so the
// next call with startOffset = start + length continues exactly there.
func changedAreas(capacity, blockSize, start int64, limit int, changed func(b int64) bool) ([]types.DiskChangeExtent, int64) {
	var areas []types.DiskChangeExtent
	nblocks := (capacity + blockSize - 1) / blockSize
	for b := start / blockSize; b < nblocks; {
		if !changed(b) {
			b++
			continue
		}
		e := b + 1
		for e < nblocks && changed(e) {
			e++
		}
		aStart := max(b*blockSize, start)
		aEnd := min(e*blockSize, capacity)
		if len(areas) == limit {
			return areas, aStart - start
		}
		areas = append(areas, types.DiskChangeExtent{Start: aStart, Length: aEnd - aStart})
		b = e
	}
	return areas, capacity - start
}

// unsort puts a page's areas in an order that is not by start, for clients that must not
// rely on it: a shuffle seeded by the page's start (the same page, the same order), and when
// that leaves two or more areas sorted, the first and last swapped.
func unsort(areas []types.DiskChangeExtent, seed int64) {
	rng := rand.New(rand.NewPCG(uint64(seed), 0x0dd0de7))
	rng.Shuffle(len(areas), func(i, j int) { areas[i], areas[j] = areas[j], areas[i] })
	sorted := slices.IsSortedFunc(areas, func(a, b types.DiskChangeExtent) int { return cmp.Compare(a.Start, b.Start) })
	if n := len(areas); n >= 2 && sorted {
		areas[0], areas[n-1] = areas[n-1], areas[0]
	}
}
