package cbtsim

import (
	"fmt"
	"sync"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// snapshotGuard answers snapshot operations that conflict or name a snapshot that is gone
// the way vCenter does, where govmomi's simulator queues them behind the VM's lock and then
// dereferences what the first one removed (a second RemoveSnapshot_Task of one snapshot
// crashed the whole simulator in VirtualMachineSnapshot.RemoveSnapshotTask).
//
// vCenter runs one snapshot operation of a VM at a time; the vSphere API documents
// TaskInProgress ("the virtual machine is busy") for CreateSnapshot(Ex)_Task,
// RemoveSnapshot_Task, RemoveAllSnapshots_Task and the reverts. So:
//   - a call on a snapshot that is not (or no longer) in its VM's snapshot tree fails with
//     ManagedObjectNotFound, as a SOAP fault of the call, like every call on a deleted
//     managed object;
//   - a snapshot operation while another one of the same VM is running returns a task that
//     has failed with TaskInProgress (task = the running task), without waiting for it;
//   - RemoveSnapshot_Task with removeChildren takes the removed descendants out of the
//     inventory too (the simulator leaves them there, callable) and moves the current
//     snapshot to the survivor vCenter would pick when it was one of them.
//
// The calls reach it through the registry's Handler (re-addressed like
// QueryChangedDiskAreas, see cbtMethods), and the simulator's own methods do the work.
// The guard learns the task a method started from the registry's PutObject hook, which runs
// before the task's goroutine, and wraps the task's body: that body re-checks the snapshot
// (the VM is locked by then) and frees the VM for the next operation when it ends.
type snapshotGuard struct {
	reg    *simulator.Registry
	panics *panicNet

	mu    sync.Mutex
	bound *sync.Cond                                   // signalled when an operation learns its task or ends
	busy  map[types.ManagedObjectReference]*snapshotOp // VM -> its snapshot operation in progress
	hooks snapshotHooks
}

// snapshotOp is one snapshot operation of a VM, from the call until its task ends.
type snapshotOp struct {
	method         string // SOAP method, e.g. "RemoveSnapshot_Task"
	ctx            *simulator.Context
	vm             types.ManagedObjectReference
	snapshot       *types.ManagedObjectReference // the snapshot the call names, if any
	removeChildren bool

	starting bool                         // the simulator's method is running: its task is about to be put
	task     types.ManagedObjectReference // the task, once put ("" Value before)
}

// snapshotHooks let tests stop snapshot tasks at fixed points (export_test.go sets them).
type snapshotHooks struct {
	// taskBody runs in a guarded task, the VM locked, before the simulator's body.
	taskBody func(method string, vm types.ManagedObjectReference)
	// snapshotPut runs inside CreateSnapshot(Ex)_Task when the new snapshot object has
	// entered the inventory, the task still running.
	snapshotPut func(vm, snapshot types.ManagedObjectReference)
	// call runs at the start of every SOAP call, before the simulator dispatches it.
	call func(method string, this types.ManagedObjectReference)
}

// snapshotMethods is the registry entry that snapshot calls are re-addressed to. It opts
// out of the registry's per-object lock (sync.Locker): calls on different VMs must not
// wait for each other, and a conflicting call must not wait at all.
type snapshotMethods struct {
	mo.ExtensibleManagedObject
	g *snapshotGuard
}

func (*snapshotMethods) Lock()   {}
func (*snapshotMethods) Unlock() {}

var snapshotMethodsRef = types.ManagedObjectReference{Type: "SendenseSnapshotMethods", Value: "snapshot-methods"}

// guardedMethods: the snapshot operations of a VM, by the type of the object called.
var guardedMethods = map[string]map[string]bool{
	"VirtualMachine": {
		"CreateSnapshot_Task": true, "CreateSnapshotEx_Task": true,
		"RemoveAllSnapshots_Task": true, "RevertToCurrentSnapshot_Task": true,
	},
	"VirtualMachineSnapshot": {"RemoveSnapshot_Task": true, "RevertToSnapshot_Task": true},
}

func newSnapshotGuard(reg *simulator.Registry, panics *panicNet) *snapshotGuard {
	g := &snapshotGuard{reg: reg, panics: panics, busy: map[types.ManagedObjectReference]*snapshotOp{}}
	g.bound = sync.NewCond(&g.mu)
	return g
}

// install registers the guard's hooks and methods; it chains the registry's Handler.
func (g *snapshotGuard) install() {
	g.reg.AddHandler(g)
	target := &snapshotMethods{ExtensibleManagedObject: mo.ExtensibleManagedObject{Self: snapshotMethodsRef}, g: g}
	g.reg.Put(target)
	next := g.reg.Handler
	g.reg.Handler = func(ctx *simulator.Context, m *simulator.Method) (mo.Reference, types.BaseMethodFault) {
		if hook := g.hook().call; hook != nil {
			hook(m.Name, m.This)
		}
		if guardedMethods[m.This.Type][m.Name] {
			m.This = snapshotMethodsRef // the request body still names the VM or snapshot
			return target, nil
		}
		if next != nil {
			return next(ctx, m)
		}
		return nil, nil
	}
}

func (g *snapshotGuard) hook() snapshotHooks {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.hooks
}

// ---- the methods ----

func (m *snapshotMethods) CreateSnapshotTask(ctx *simulator.Context, req *types.CreateSnapshot_Task) soap.HasFault {
	body := &methods.CreateSnapshot_TaskBody{}
	vm, fault := m.g.vm(ctx, req.This)
	if fault == nil {
		var res soap.HasFault
		var task types.ManagedObjectReference
		res, task, fault = m.g.run(ctx, vm, &snapshotOp{method: "CreateSnapshot_Task"}, func() soap.HasFault { return vm.CreateSnapshotTask(ctx, req) })
		if res != nil {
			return res
		}
		if fault == nil {
			body.Res = &types.CreateSnapshot_TaskResponse{Returnval: task}
		}
	}
	body.Fault_ = fault
	return body
}

func (m *snapshotMethods) CreateSnapshotExTask(ctx *simulator.Context, req *types.CreateSnapshotEx_Task) soap.HasFault {
	body := &methods.CreateSnapshotEx_TaskBody{}
	vm, fault := m.g.vm(ctx, req.This)
	if fault == nil {
		var res soap.HasFault
		var task types.ManagedObjectReference
		res, task, fault = m.g.run(ctx, vm, &snapshotOp{method: "CreateSnapshotEx_Task"}, func() soap.HasFault { return vm.CreateSnapshotExTask(ctx, req) })
		if res != nil {
			return res
		}
		if fault == nil {
			body.Res = &types.CreateSnapshotEx_TaskResponse{Returnval: task}
		}
	}
	body.Fault_ = fault
	return body
}

func (m *snapshotMethods) RemoveAllSnapshotsTask(ctx *simulator.Context, req *types.RemoveAllSnapshots_Task) soap.HasFault {
	body := &methods.RemoveAllSnapshots_TaskBody{}
	vm, fault := m.g.vm(ctx, req.This)
	if fault == nil {
		var res soap.HasFault
		var task types.ManagedObjectReference
		res, task, fault = m.g.run(ctx, vm, &snapshotOp{method: "RemoveAllSnapshots_Task"}, func() soap.HasFault { return vm.RemoveAllSnapshotsTask(ctx, req) })
		if res != nil {
			return res
		}
		if fault == nil {
			body.Res = &types.RemoveAllSnapshots_TaskResponse{Returnval: task}
		}
	}
	body.Fault_ = fault
	return body
}

func (m *snapshotMethods) RevertToCurrentSnapshotTask(ctx *simulator.Context, req *types.RevertToCurrentSnapshot_Task) soap.HasFault {
	body := &methods.RevertToCurrentSnapshot_TaskBody{}
	vm, fault := m.g.vm(ctx, req.This)
	if fault == nil {
		var res soap.HasFault
		var task types.ManagedObjectReference
		res, task, fault = m.g.run(ctx, vm, &snapshotOp{method: "RevertToCurrentSnapshot_Task"}, func() soap.HasFault { return vm.RevertToCurrentSnapshotTask(ctx, req) })
		if res != nil {
			return res
		}
		if fault == nil {
			body.Res = &types.RevertToCurrentSnapshot_TaskResponse{Returnval: task}
		}
	}
	body.Fault_ = fault
	return body
}

func (m *snapshotMethods) RemoveSnapshotTask(ctx *simulator.Context, req *types.RemoveSnapshot_Task) soap.HasFault {
	body := &methods.RemoveSnapshot_TaskBody{}
	snap, vm, fault := m.g.snapshot(ctx, req.This)
	if fault == nil {
		var res soap.HasFault
		var task types.ManagedObjectReference
		op := &snapshotOp{method: "RemoveSnapshot_Task", snapshot: &req.This, removeChildren: req.RemoveChildren}
		res, task, fault = m.g.run(ctx, vm, op, func() soap.HasFault { return snap.RemoveSnapshotTask(ctx, req) })
		if res != nil {
			return res
		}
		if fault == nil {
			body.Res = &types.RemoveSnapshot_TaskResponse{Returnval: task}
		}
	}
	body.Fault_ = fault
	return body
}

func (m *snapshotMethods) RevertToSnapshotTask(ctx *simulator.Context, req *types.RevertToSnapshot_Task) soap.HasFault {
	body := &methods.RevertToSnapshot_TaskBody{}
	snap, vm, fault := m.g.snapshot(ctx, req.This)
	if fault == nil {
		var res soap.HasFault
		var task types.ManagedObjectReference
		op := &snapshotOp{method: "RevertToSnapshot_Task", snapshot: &req.This}
		res, task, fault = m.g.run(ctx, vm, op, func() soap.HasFault { return snap.RevertToSnapshotTask(ctx, req) })
		if res != nil {
			return res
		}
		if fault == nil {
			body.Res = &types.RevertToSnapshot_TaskResponse{Returnval: task}
		}
	}
	body.Fault_ = fault
	return body
}

// ---- the rules ----

func (g *snapshotGuard) vm(ctx *simulator.Context, ref types.ManagedObjectReference) (*simulator.VirtualMachine, *soap.Fault) {
	vm, ok := ctx.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return nil, managedObjectNotFound(ref)
	}
	return vm, nil
}

func (g *snapshotGuard) snapshot(ctx *simulator.Context, ref types.ManagedObjectReference) (*simulator.VirtualMachineSnapshot, *simulator.VirtualMachine, *soap.Fault) {
	snap, ok := ctx.Map.Get(ref).(*simulator.VirtualMachineSnapshot)
	if !ok {
		return nil, nil, managedObjectNotFound(ref)
	}
	vm, ok := ctx.Map.Get(snap.Vm).(*simulator.VirtualMachine) // Vm never changes
	if !ok {
		return nil, nil, managedObjectNotFound(ref)
	}
	return snap, vm, nil
}

// run starts op on vm with start (the simulator's own method). It returns start's answer;
// or a task that failed with TaskInProgress when another snapshot operation of the VM is
// running; or a fault when the snapshot op names is no longer in the VM's tree.
func (g *snapshotGuard) run(ctx *simulator.Context, vm *simulator.VirtualMachine, op *snapshotOp, start func() soap.HasFault) (soap.HasFault, types.ManagedObjectReference, *soap.Fault) {
	op.ctx, op.vm = ctx, vm.Self
	g.mu.Lock()
	for {
		running := g.busy[op.vm]
		if running == nil {
			break
		}
		if running.task.Value != "" {
			g.mu.Unlock()
			return nil, g.failedTask(ctx, op, &types.TaskInProgress{Task: running.task}, "Another task is already in progress."), nil
		}
		// The running operation is inside the simulator's method (which never waits long
		// for anything but the VM's lock): its task is about to exist, and the
		// TaskInProgress fault must name it.
		g.bound.Wait()
	}
	g.busy[op.vm] = op
	op.starting = true
	g.mu.Unlock()

	var res soap.HasFault
	var fault *soap.Fault
	ctx.WithLock(vm, func() { // as the simulator's dispatcher would for a method of the VM
		if op.snapshot != nil && !inSnapshotTree(vm, *op.snapshot) {
			fault = managedObjectNotFound(*op.snapshot)
			return
		}
		if f := g.panics.recoverCall(op.method+" on "+op.vm.Value, func() { res = start() }); f != nil {
			fault = simulator.Fault("A general system error occurred: "+f.Reason, f)
		}
	})

	g.mu.Lock()
	op.starting = false
	if op.task.Value == "" {
		g.releaseLocked(op) // no task: a fault, or nothing to wait for
	}
	g.mu.Unlock()
	return res, types.ManagedObjectReference{}, fault
}

func (g *snapshotGuard) releaseLocked(op *snapshotOp) {
	if g.busy[op.vm] == op {
		delete(g.busy, op.vm)
	}
	g.bound.Broadcast()
}

// failedTask puts a task for op that has already failed with fault, without touching the VM
// (whose lock the running operation holds).
func (g *snapshotGuard) failedTask(ctx *simulator.Context, op *snapshotOp, fault types.BaseMethodFault, message string) types.ManagedObjectReference {
	t := simulator.CreateTask(op.vm, taskName[op.method], nil)
	ctx.Map.Put(t)
	now := time.Now()
	ctx.WithLock(t, func() {
		t.Info.Key = t.Self.Value
		t.Info.Task = t.Self
		ctx.Update(t, []types.PropertyChange{
			{Name: "info.startTime", Val: now},
			{Name: "info.completeTime", Val: now},
			{Name: "info.state", Val: types.TaskInfoStateError},
			{Name: "info.error", Val: types.LocalizedMethodFault{Fault: fault, LocalizedMessage: message}},
		})
	})
	return t.Self
}

// taskName: the simulator's name of each method's task (its Info.Name and DescriptionId).
var taskName = map[string]string{
	"CreateSnapshot_Task":          "createSnapshotEx",
	"CreateSnapshotEx_Task":        "createSnapshotEx",
	"RemoveAllSnapshots_Task":      "RemoveAllSnapshots",
	"RevertToCurrentSnapshot_Task": "revertSnapshot",
	"RemoveSnapshot_Task":          "removeSnapshot",
	"RevertToSnapshot_Task":        "revertToSnapshot",
}

// ---- registry hooks (simulator.RegisterObject) ----

// Reference identifies the guard among the registry's handlers.
func (g *snapshotGuard) Reference() types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: "SendenseSnapshotGuard", Value: "snapshot-guard"}
}

// PutObject sees every task before its goroutine starts: every task body gets the panic
// net, and the task of an operation being started becomes that operation's.
func (g *snapshotGuard) PutObject(_ *simulator.Context, obj mo.Reference) {
	switch o := obj.(type) {
	case *simulator.Task:
		if o.Execute == nil || o.Info.Entity == nil {
			return // no body: made by TaskManager.CreateTask or failedTask
		}
		g.mu.Lock()
		op := g.busy[*o.Info.Entity]
		if op != nil && op.starting && op.task.Value == "" {
			// The operation holds the VM's lock while the simulator's method runs, and every
			// other method that starts a task on a VM holds it too: this is its task.
			op.task = o.Self
			g.bound.Broadcast()
			g.guardBody(o, op)
		}
		g.mu.Unlock()
		g.panics.guardTask(o)
	case *simulator.VirtualMachineSnapshot:
		if hook := g.hook().snapshotPut; hook != nil {
			hook(o.Vm, o.Self)
		}
	}
}

func (g *snapshotGuard) UpdateObject(*simulator.Context, mo.Reference, []types.PropertyChange) {}

func (g *snapshotGuard) RemoveObject(*simulator.Context, types.ManagedObjectReference) {}

// guardBody wraps the body of op's task: it runs with the VM locked (the simulator hands the
// lock to the task), checks the snapshot again, cleans up after a removal with children,
// and frees the VM for the next snapshot operation when it ends, whatever happens.
func (g *snapshotGuard) guardBody(t *simulator.Task, op *snapshotOp) {
	body := t.Execute
	t.Execute = func(task *simulator.Task) (types.AnyType, types.BaseMethodFault) {
		defer func() {
			g.mu.Lock()
			g.releaseLocked(op)
			g.mu.Unlock()
		}()
		if hook := g.hook().taskBody; hook != nil {
			hook(op.method, op.vm)
		}
		vm, ok := g.reg.Get(op.vm).(*simulator.VirtualMachine)
		if !ok {
			return nil, &types.ManagedObjectNotFound{Obj: op.vm}
		}
		if op.snapshot != nil && !inSnapshotTree(vm, *op.snapshot) {
			return nil, &types.ManagedObjectNotFound{Obj: *op.snapshot}
		}
		var doomed []types.ManagedObjectReference
		var parent *types.ManagedObjectReference
		if op.method == "RemoveSnapshot_Task" && op.removeChildren {
			if n := findSnapshot(vm.Snapshot.RootSnapshotList, *op.snapshot); n != nil {
				collectRefs(n.ChildSnapshotList, &doomed)
			}
			parent = snapshotParent(vm.Snapshot.RootSnapshotList, *op.snapshot)
		}
		res, fault := body(task)
		if len(doomed) > 0 {
			g.forget(op.ctx, vm, doomed, parent)
		}
		return res, fault
	}
}

// forget takes the descendants a RemoveSnapshot_Task(removeChildren) removed out of the
// inventory, which the simulator leaves there; when the current snapshot was one of them,
// the removed snapshot's parent becomes current, as the removed snapshot itself would
// have (none when it was a root).
func (g *snapshotGuard) forget(ctx *simulator.Context, vm *simulator.VirtualMachine, doomed []types.ManagedObjectReference, parent *types.ManagedObjectReference) {
	if vm.Snapshot != nil && vm.Snapshot.CurrentSnapshot != nil {
		for _, ref := range doomed {
			if *vm.Snapshot.CurrentSnapshot == ref {
				ctx.Update(vm, []types.PropertyChange{{Name: "snapshot.currentSnapshot", Val: parent}})
				break
			}
		}
	}
	for _, ref := range doomed {
		if g.reg.Get(ref) != nil {
			ctx.Map.Remove(ctx, ref)
		}
	}
}

// ---- the snapshot tree (read with the VM locked) ----

func inSnapshotTree(vm *simulator.VirtualMachine, ref types.ManagedObjectReference) bool {
	return vm.Snapshot != nil && findSnapshot(vm.Snapshot.RootSnapshotList, ref) != nil
}

func findSnapshot(tree []types.VirtualMachineSnapshotTree, ref types.ManagedObjectReference) *types.VirtualMachineSnapshotTree {
	for i := range tree {
		if tree[i].Snapshot == ref {
			return &tree[i]
		}
		if n := findSnapshot(tree[i].ChildSnapshotList, ref); n != nil {
			return n
		}
	}
	return nil
}

func snapshotParent(tree []types.VirtualMachineSnapshotTree, ref types.ManagedObjectReference) *types.ManagedObjectReference {
	for i := range tree {
		for _, c := range tree[i].ChildSnapshotList {
			if c.Snapshot == ref {
				return &tree[i].Snapshot
			}
		}
		if p := snapshotParent(tree[i].ChildSnapshotList, ref); p != nil {
			return p
		}
	}
	return nil
}

func collectRefs(tree []types.VirtualMachineSnapshotTree, into *[]types.ManagedObjectReference) {
	for _, n := range tree {
		*into = append(*into, n.Snapshot)
		collectRefs(n.ChildSnapshotList, into)
	}
}

// managedObjectNotFound is vCenter's answer to a call on a managed object that is gone.
func managedObjectNotFound(ref types.ManagedObjectReference) *soap.Fault {
	return simulator.Fault(fmt.Sprintf("The object '%s:%s' has already been deleted or has not been completely created", vmodlType(ref.Type), ref.Value),
		&types.ManagedObjectNotFound{Obj: ref})
}

// vmodlType names a managed object type as vCenter's messages do.
func vmodlType(t string) string {
	switch t {
	case "VirtualMachine":
		return "vim.VirtualMachine"
	case "VirtualMachineSnapshot":
		return "vim.vm.Snapshot"
	case "Task":
		return "vim.Task"
	}
	return "vim." + t
}
