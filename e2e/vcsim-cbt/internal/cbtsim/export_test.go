package cbtsim

import "github.com/vmware/govmomi/vim25/types"

// Test hooks: they let tests hold snapshot tasks at fixed points and inject panics. Each
// runs on the simulator's goroutine; nil removes it.

// SetSnapshotTaskHook runs f in every guarded snapshot task (the VM locked) before the
// simulator's own body: blocking in f keeps the operation in progress.
func (s *Server) SetSnapshotTaskHook(f func(method string, vm types.ManagedObjectReference)) {
	s.guard.mu.Lock()
	defer s.guard.mu.Unlock()
	s.guard.hooks.taskBody = f
}

// SetSnapshotPutHook runs f inside CreateSnapshot(Ex)_Task once the new snapshot object is
// in the inventory: blocking in f keeps the creation in progress with the snapshot's moref
// already valid.
func (s *Server) SetSnapshotPutHook(f func(vm, snapshot types.ManagedObjectReference)) {
	s.guard.mu.Lock()
	defer s.guard.mu.Unlock()
	s.guard.hooks.snapshotPut = f
}

// SetCallHook runs f at the start of every SOAP call, before the simulator dispatches it.
func (s *Server) SetCallHook(f func(method string, this types.ManagedObjectReference)) {
	s.guard.mu.Lock()
	defer s.guard.mu.Unlock()
	s.guard.hooks.call = f
}
