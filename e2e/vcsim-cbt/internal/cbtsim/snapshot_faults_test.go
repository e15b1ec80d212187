package cbtsim_test

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"

	"sendense.io/e2e/vcsim-cbt/internal/cbtsim"
)

// Snapshot operations that repeat, overlap or name a snapshot that is gone, over real SOAP:
// the simulator answers with vCenter's faults (ManagedObjectNotFound of the call for a
// snapshot that is gone, a task failed with TaskInProgress while the VM is busy with
// another snapshot operation) and keeps serving. A panic anywhere fails the test (start).

// outcome is what a client sees of one call that starts a task.
type outcome struct {
	task   types.ManagedObjectReference // the task, when the call returned one
	fault  any                          // the call's fault, or the task's (a vim fault type, value or pointer)
	inCall bool                         // the fault is the call's
	result types.AnyType                // the task's result
	err    error                        // neither a fault nor a result: transport, the simulator gone
}

// String names the outcome: "success", "<Fault> (call)" or "<Fault> (task)".
func (o outcome) String() string {
	switch {
	case o.err != nil:
		return "error: " + o.err.Error()
	case o.fault == nil:
		return "success"
	case o.inCall:
		return typeName(o.fault) + " (call)"
	}
	return typeName(o.fault) + " (task)"
}

// started makes the outcome of a call that returns a task.
func started(task types.ManagedObjectReference, err error) outcome {
	switch {
	case err == nil:
		return outcome{task: task}
	case soap.IsSoapFault(err) && soap.ToSoapFault(err).VimFault() != nil:
		return outcome{fault: soap.ToSoapFault(err).VimFault(), inCall: true}
	}
	return outcome{err: err}
}

// finish waits for the task of o, if any.
func (e *env) finish(o outcome) outcome {
	if o.task.Value == "" {
		return o
	}
	res, err := object.NewTask(e.c, o.task).WaitForResult(e.ctx)
	if err != nil {
		if f := taskFault(err); f != nil {
			o.fault = f
		} else {
			o.err = err
		}
		return o
	}
	o.result = res.Result
	return o
}

func (e *env) callRemove(ref types.ManagedObjectReference, children bool) outcome {
	res, err := methods.RemoveSnapshot_Task(e.ctx, e.c, &types.RemoveSnapshot_Task{This: ref, RemoveChildren: children})
	if err != nil {
		return started(types.ManagedObjectReference{}, err)
	}
	return started(res.Returnval, nil)
}

func (e *env) callRemoveAll() outcome {
	res, err := methods.RemoveAllSnapshots_Task(e.ctx, e.c, &types.RemoveAllSnapshots_Task{This: e.vm.Reference()})
	if err != nil {
		return started(types.ManagedObjectReference{}, err)
	}
	return started(res.Returnval, nil)
}

func (e *env) callCreate(name string) outcome {
	res, err := methods.CreateSnapshot_Task(e.ctx, e.c, &types.CreateSnapshot_Task{This: e.vm.Reference(), Name: name})
	if err != nil {
		return started(types.ManagedObjectReference{}, err)
	}
	return started(res.Returnval, nil)
}

func (e *env) callRevert(ref types.ManagedObjectReference) outcome {
	res, err := methods.RevertToSnapshot_Task(e.ctx, e.c, &types.RevertToSnapshot_Task{This: ref})
	if err != nil {
		return started(types.ManagedObjectReference{}, err)
	}
	return started(res.Returnval, nil)
}

// expect fails unless o is want ("success", "ManagedObjectNotFound (call)", ...).
func expect(t *testing.T, what string, o outcome, want string) {
	t.Helper()
	if got := o.String(); got != want {
		t.Fatalf("%s: %s, want %s", what, got, want)
	}
}

// expectNotFound fails unless o is the call's ManagedObjectNotFound naming ref.
func expectNotFound(t *testing.T, what string, o outcome, ref types.ManagedObjectReference) {
	t.Helper()
	expect(t, what, o, "ManagedObjectNotFound (call)")
	var obj types.ManagedObjectReference
	switch f := o.fault.(type) {
	case types.ManagedObjectNotFound:
		obj = f.Obj
	case *types.ManagedObjectNotFound:
		obj = f.Obj
	}
	if obj != ref {
		t.Fatalf("%s: ManagedObjectNotFound names %v, want %v", what, obj, ref)
	}
}

// expectBusy fails unless o is a task that failed with TaskInProgress naming running.
func expectBusy(t *testing.T, what string, o outcome, running types.ManagedObjectReference) {
	t.Helper()
	expect(t, what, o, "TaskInProgress (task)")
	var task types.ManagedObjectReference
	switch f := o.fault.(type) {
	case types.TaskInProgress:
		task = f.Task
	case *types.TaskInProgress:
		task = f.Task
	}
	if task != running {
		t.Fatalf("%s: TaskInProgress names task %v, want the running one %v", what, task, running)
	}
}

// expectGone: the other requests a client may send about a snapshot fault
// ManagedObjectNotFound too (reading its properties, exporting, renaming it).
func expectGone(e *env, ref types.ManagedObjectReference) {
	e.t.Helper()
	var m mo.VirtualMachineSnapshot
	err := property.DefaultCollector(e.c).RetrieveOne(e.ctx, ref, []string{"config.hardware.device"}, &m)
	expectFault(e.t, "reading config.hardware.device of "+ref.Value, err, "ManagedObjectNotFound", "")
	_, err = methods.ExportSnapshot(e.ctx, e.c, &types.ExportSnapshot{This: ref})
	expectFault(e.t, "ExportSnapshot of "+ref.Value, err, "ManagedObjectNotFound", "")
	_, err = methods.RenameSnapshot(e.ctx, e.c, &types.RenameSnapshot{This: ref, Name: "renamed"})
	expectFault(e.t, "RenameSnapshot of "+ref.Value, err, "ManagedObjectNotFound", "")
}

// snapshotTree is the VM's snapshot tree as names, e.g. "s1(s2 s3)"; "" without snapshots.
// It reads the VM: never call it while a task holds the VM.
func (e *env) snapshotTree() string {
	e.t.Helper()
	var m mo.VirtualMachine
	if err := property.DefaultCollector(e.c).RetrieveOne(e.ctx, e.vm.Reference(), []string{"snapshot"}, &m); err != nil {
		e.t.Fatalf("retrieve snapshot tree: %v", err)
	}
	if m.Snapshot == nil {
		return ""
	}
	var show func([]types.VirtualMachineSnapshotTree) string
	show = func(tree []types.VirtualMachineSnapshotTree) string {
		var parts []string
		for _, n := range tree {
			s := n.Name
			if len(n.ChildSnapshotList) > 0 {
				s += "(" + show(n.ChildSnapshotList) + ")"
			}
			parts = append(parts, s)
		}
		return strings.Join(parts, " ")
	}
	return show(m.Snapshot.RootSnapshotList)
}

func (e *env) expectTree(what, want string) {
	e.t.Helper()
	if got := e.snapshotTree(); got != want {
		e.t.Fatalf("%s: snapshot tree %q, want %q", what, got, want)
	}
}

// stillServes: a snapshot can be created and removed, and the tree is back as it was.
func (e *env) stillServes() {
	e.t.Helper()
	before := e.snapshotTree()
	s := e.snapshot("still-serving")
	e.removeSnapshot(s, false)
	e.expectTree("after a create and a remove", before)
}

// held keeps one snapshot task in progress until released.
type held struct {
	entered chan struct{}
	release func()
}

// hold keeps the first guarded task of method, once started, in progress (the VM locked)
// until release. While it is held the test must not read the VM's properties.
func (e *env) hold(method string) *held {
	h := &held{entered: make(chan struct{})}
	gate := make(chan struct{})
	var first, released sync.Once
	h.release = func() { released.Do(func() { close(gate) }) }
	e.srv.SetSnapshotTaskHook(func(m string, _ types.ManagedObjectReference) {
		if m != method {
			return
		}
		mine := false
		first.Do(func() { mine = true })
		if mine {
			close(h.entered)
			<-gate
		}
	})
	e.t.Cleanup(func() { h.release(); e.srv.SetSnapshotTaskHook(nil) })
	return h
}

func (h *held) wait(t *testing.T) {
	t.Helper()
	select {
	case <-h.entered:
	case <-time.After(30 * time.Second):
		t.Fatal("the held task did not start within 30s")
	}
}

// concurrently runs n calls at once and returns their outcomes (tasks waited for).
func (e *env) concurrently(n int, call func(i int) outcome) []outcome {
	out := make([]outcome, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out[i] = e.finish(call(i))
		}()
	}
	wg.Wait()
	return out
}

// A removed snapshot is gone for every request: removing it again (as a client does after
// its first call timed out), with or without children, reverting to it, querying its
// changed areas, reading its properties, exporting or renaming it.
func TestRequestsOnARemovedSnapshotAreManagedObjectNotFound(t *testing.T) {
	e := start(t, nil)
	s1 := e.snapshot("s1")
	e.removeSnapshot(s1, false)
	expectNotFound(t, "RemoveSnapshot_Task again", e.finish(e.callRemove(s1, false)), s1)
	expectNotFound(t, "RemoveSnapshot_Task(removeChildren) again", e.finish(e.callRemove(s1, true)), s1)
	expectNotFound(t, "RevertToSnapshot_Task", e.finish(e.callRevert(s1)), s1)
	_, err := e.query(&s1, disk, 0, "*")
	expectFault(t, "QueryChangedDiskAreas", err, "ManagedObjectNotFound", "")
	if !strings.Contains(err.Error(), "'vim.vm.Snapshot:"+s1.Value+"' has already been deleted") {
		t.Fatalf("QueryChangedDiskAreas: message %q is not vCenter's", err)
	}
	expectGone(e, s1)
	e.expectTree("after the removal", "")
	e.stillServes()
}

// The descendants RemoveSnapshot_Task(removeChildren) takes with it are gone as well (the
// simulator left them callable), and when the current snapshot was one of them, the next
// snapshot becomes a child of the survivor (the simulator crashed there).
func TestRemovedChildrenAreGoneToo(t *testing.T) {
	e := start(t, nil)
	s1 := e.snapshot("s1")
	s2 := e.snapshot("s2") // child of s1, current
	s3 := e.snapshot("s3") // child of s2, current
	e.expectTree("three in a chain", "s1(s2(s3))")
	e.removeSnapshot(s2, true)
	e.expectTree("after removing s2 with its children", "s1")
	for _, ref := range []types.ManagedObjectReference{s2, s3} {
		expectNotFound(t, "RemoveSnapshot_Task of "+ref.Value, e.finish(e.callRemove(ref, false)), ref)
		expectNotFound(t, "RevertToSnapshot_Task to "+ref.Value, e.finish(e.callRevert(ref)), ref)
		expectGone(e, ref)
	}
	s4 := e.snapshot("s4")
	e.expectTree("a new snapshot after the removal", "s1(s4)")
	e.removeSnapshot(s4, false)
	e.removeSnapshot(s1, false)
	e.expectTree("all removed", "")
	e.stillServes()
}

// The reported crash: a RemoveSnapshot_Task sent again, several times and at once, while the
// first one of the same snapshot still runs. Each answer is a task failed with
// TaskInProgress naming the running task; the first succeeds; afterwards the snapshot is
// gone. So are other snapshot operations of the VM while it runs.
func TestRemovalsOfASnapshotBeingRemovedAreTaskInProgress(t *testing.T) {
	e := start(t, nil)
	s1 := e.snapshot("s1")
	h := e.hold("RemoveSnapshot_Task")
	first := e.callRemove(s1, false)
	expect(t, "the first RemoveSnapshot_Task call", first, "success")
	h.wait(t)
	for i, o := range e.concurrently(4, func(int) outcome { return e.callRemove(s1, false) }) {
		expectBusy(t, fmt.Sprintf("RemoveSnapshot_Task #%d while the first runs", i+2), o, first.task)
	}
	expectBusy(t, "RemoveSnapshot_Task(removeChildren) while the first runs", e.finish(e.callRemove(s1, true)), first.task)
	expectBusy(t, "RevertToSnapshot_Task while the removal runs", e.finish(e.callRevert(s1)), first.task)
	expectBusy(t, "RemoveAllSnapshots_Task while the removal runs", e.finish(e.callRemoveAll()), first.task)
	expectBusy(t, "CreateSnapshot_Task while the removal runs", e.finish(e.callCreate("s2")), first.task)
	h.release()
	expect(t, "the first removal", e.finish(first), "success")
	expectNotFound(t, "RemoveSnapshot_Task after the first finished", e.finish(e.callRemove(s1, false)), s1)
	e.expectTree("after the removal", "")
	e.stillServes()
}

// Without holding anything: several RemoveSnapshot_Task of one snapshot at once, round after
// round. Exactly one removes it; each other is TaskInProgress (it came while that one ran)
// or ManagedObjectNotFound (it came after).
func TestConcurrentRemovalsOfOneSnapshot(t *testing.T) {
	e := start(t, nil)
	const rounds, callers = 8, 6
	seen := map[string]int{}
	for round := range rounds {
		s := e.snapshot(fmt.Sprintf("round-%d", round))
		successes := 0
		for i, o := range e.concurrently(callers, func(int) outcome { return e.callRemove(s, false) }) {
			seen[o.String()]++
			switch o.String() {
			case "success":
				successes++
			case "TaskInProgress (task)", "ManagedObjectNotFound (call)":
			default:
				t.Fatalf("round %d caller %d: %s", round, i, o)
			}
		}
		if successes != 1 {
			t.Fatalf("round %d: %d removals succeeded, want exactly 1", round, successes)
		}
		e.expectTree(fmt.Sprintf("after round %d", round), "")
	}
	t.Logf("outcomes over %d rounds of %d callers: %v", rounds, callers, seen)
	e.stillServes()
}

// A snapshot whose creation is still in progress (its moref already valid): removing it,
// removing all snapshots or creating another fails with TaskInProgress naming the creation;
// the creation then succeeds and the snapshot can be removed.
func TestRemovalOfASnapshotBeingCreatedIsTaskInProgress(t *testing.T) {
	e := start(t, nil)
	created := make(chan types.ManagedObjectReference, 1)
	gate := make(chan struct{})
	var once, released sync.Once
	release := func() { released.Do(func() { close(gate) }) }
	e.srv.SetSnapshotPutHook(func(_, snap types.ManagedObjectReference) {
		mine := false
		once.Do(func() { mine = true })
		if mine {
			created <- snap
			<-gate
		}
	})
	t.Cleanup(func() { release(); e.srv.SetSnapshotPutHook(nil) })

	create := e.callCreate("being-created")
	expect(t, "the CreateSnapshot_Task call", create, "success")
	var snap types.ManagedObjectReference
	select {
	case snap = <-created:
	case <-time.After(30 * time.Second):
		t.Fatal("the snapshot object did not appear within 30s")
	}
	expectBusy(t, "RemoveSnapshot_Task of the snapshot being created", e.finish(e.callRemove(snap, false)), create.task)
	expectBusy(t, "RemoveSnapshot_Task(removeChildren) of it", e.finish(e.callRemove(snap, true)), create.task)
	expectBusy(t, "RemoveAllSnapshots_Task during the creation", e.finish(e.callRemoveAll()), create.task)
	expectBusy(t, "a second CreateSnapshot_Task during the creation", e.finish(e.callCreate("second")), create.task)
	release()
	done := e.finish(create)
	expect(t, "the creation", done, "success")
	if got, ok := done.result.(types.ManagedObjectReference); !ok || got != snap {
		t.Fatalf("the creation's result %v, want %v", done.result, snap)
	}
	e.expectTree("after the creation", "being-created")
	e.removeSnapshot(snap, false)
	e.expectTree("after removing it", "")
	e.stillServes()
}

// RemoveAllSnapshots_Task and RemoveSnapshot_Task of one VM: whichever comes while the other
// runs is TaskInProgress; afterwards a removal of a snapshot RemoveAll took is
// ManagedObjectNotFound, and RemoveAll of a VM without snapshots succeeds (as vCenter's).
func TestRemoveAllRacingRemove(t *testing.T) {
	e := start(t, nil)

	t.Run("RemoveAll while a removal runs", func(t *testing.T) {
		e.t = t
		s1 := e.snapshot("s1")
		s2 := e.snapshot("s2")
		h := e.hold("RemoveSnapshot_Task")
		remove := e.callRemove(s1, false)
		h.wait(t)
		expectBusy(t, "RemoveAllSnapshots_Task", e.finish(e.callRemoveAll()), remove.task)
		h.release()
		expect(t, "the removal of s1", e.finish(remove), "success")
		e.expectTree("after removing s1", "s2")
		expect(t, "RemoveAllSnapshots_Task again", e.finish(e.callRemoveAll()), "success")
		e.expectTree("after RemoveAll", "")
		expectNotFound(t, "RemoveSnapshot_Task of s2", e.finish(e.callRemove(s2, false)), s2)
		expect(t, "RemoveAllSnapshots_Task without snapshots", e.finish(e.callRemoveAll()), "success")
	})

	t.Run("a removal while RemoveAll runs", func(t *testing.T) {
		e.t = t
		s1 := e.snapshot("s1")
		s2 := e.snapshot("s2")
		h := e.hold("RemoveAllSnapshots_Task")
		all := e.callRemoveAll()
		h.wait(t)
		expectBusy(t, "RemoveSnapshot_Task of s2", e.finish(e.callRemove(s2, false)), all.task)
		h.release()
		expect(t, "RemoveAllSnapshots_Task", e.finish(all), "success")
		e.expectTree("after RemoveAll", "")
		expectNotFound(t, "RemoveSnapshot_Task of s1", e.finish(e.callRemove(s1, false)), s1)
		expectNotFound(t, "RemoveSnapshot_Task of s2", e.finish(e.callRemove(s2, true)), s2)
	})

	t.Run("both at once", func(t *testing.T) {
		e.t = t
		for round := range 8 {
			s1 := e.snapshot("s1")
			e.snapshot("s2")
			out := e.concurrently(2, func(i int) outcome {
				if i == 0 {
					return e.callRemoveAll()
				}
				return e.callRemove(s1, false)
			})
			all, one := out[0].String(), out[1].String()
			switch {
			case all == "success" && (one == "success" || one == "TaskInProgress (task)" || one == "ManagedObjectNotFound (call)"):
				e.expectTree(fmt.Sprintf("round %d (%s, %s)", round, all, one), "")
			case all == "TaskInProgress (task)" && one == "success":
				e.expectTree(fmt.Sprintf("round %d (%s, %s)", round, all, one), "s2")
				e.removeAllSnapshots()
			default:
				t.Fatalf("round %d: RemoveAll %s, RemoveSnapshot %s", round, all, one)
			}
		}
	})
	e.t = t
	e.stillServes()
}

// The safety net: a panic in a SOAP call and one in a task body are each logged with the
// marker and answered with SystemError; the simulator keeps serving, the VM is not left
// busy or locked.
func TestPanicsAreAnsweredAndLogged(t *testing.T) {
	e := start(t, nil)
	e.expectPanics = 2

	e.srv.SetCallHook(func(method string, _ types.ManagedObjectReference) {
		if method == "CurrentTime" {
			panic("injected into CurrentTime")
		}
	})
	_, err := methods.GetCurrentTime(e.ctx, e.c)
	expectFault(t, "CurrentTime with a panic", err, "SystemError", "")
	e.srv.SetCallHook(nil)
	if _, err := methods.GetCurrentTime(e.ctx, e.c); err != nil {
		t.Fatalf("CurrentTime after the panic: %v", err)
	}

	s1 := e.snapshot("s1")
	e.srv.SetSnapshotTaskHook(func(method string, _ types.ManagedObjectReference) {
		if method == "RemoveSnapshot_Task" {
			panic("injected into RemoveSnapshot_Task")
		}
	})
	expect(t, "RemoveSnapshot_Task with a panic", e.finish(e.callRemove(s1, false)), "SystemError (task)")
	e.srv.SetSnapshotTaskHook(nil)
	e.expectTree("after the failed removal", "s1")
	e.removeSnapshot(s1, false)
	e.stillServes()

	logs := e.logs.String()
	for _, want := range []string{
		cbtsim.PanicMarker + " SOAP call POST /sdk: injected into CurrentTime",
		cbtsim.PanicMarker + " task VirtualMachine.removeSnapshot",
		"injected into RemoveSnapshot_Task\ngoroutine ", // the stack follows the marker line
	} {
		if !strings.Contains(logs, want) {
			t.Fatalf("the log lacks %q:\n%s", want, logs)
		}
	}
	if got := e.srv.Panics(); got != 2 {
		t.Fatalf("Panics() = %d, want 2", got)
	}
}
