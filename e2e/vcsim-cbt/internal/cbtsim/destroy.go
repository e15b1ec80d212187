package cbtsim

import (
	"errors"
	"os"
	"path/filepath"
	"strings"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

// Destroy_Task: the simulator deletes the VM's directory in a task of its own that the
// destroy task does not wait for, so the files can outlive the completed task, and that
// late deletion could even take the directory of a new VM of the same name. vCenter has
// deleted them when the task completes, and a test (or a restore that replaces a VM) may
// look at once: the destroy task's body is wrapped to wait, once the simulator's body has
// succeeded, for the simulator's deletion, then delete the VM's directory and the files of
// its disks and snapshots the tracker knows, wherever they are.

const destroyTaskID = "VirtualMachine.destroy" // simulator.Task Info.DescriptionId

// deleteFilesOnDestroy wraps the body of a VM's Destroy_Task; t is put, not yet running.
func (t *tracker) deleteFilesOnDestroy(task *simulator.Task) {
	ref := *task.Info.Entity
	body := task.Execute
	task.Execute = func(task *simulator.Task) (types.AnyType, types.BaseMethodFault) {
		// Listed first: the body unregisters the VM, which drops its tracker state.
		dir, files := t.vmFiles(ref)
		res, fault := body(task)
		if fault != nil {
			return res, fault
		}
		// The simulator's deletion task took the FileManager's lock before the body
		// returned (a task holds its object's lock from its start to its end): taking it
		// on behalf of another context waits for that task.
		t.newContext().WithLock(t.reg.FileManager(), func() {})
		for _, f := range files {
			if f == "" {
				continue
			}
			if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
				t.logf("vcsim-cbt: destroy %s: %v", ref.Value, err)
			}
		}
		if dir != "" {
			if err := os.RemoveAll(dir); err != nil {
				t.logf("vcsim-cbt: destroy %s: %v", ref.Value, err)
			}
		}
		return res, fault
	}
}

// vmFiles returns the local directory of the VM (its log directory, as the simulator
// deletes it; "" when that is not a directory strictly inside a datastore) and the files
// of its disks and snapshots. The caller holds the VM's lock (the task's).
func (t *tracker) vmFiles(ref types.ManagedObjectReference) (dir string, files []string) {
	vm, ok := t.reg.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return "", nil
	}
	if vm.Config != nil && vm.Config.Files.LogDirectory != "" {
		dir = t.vmDirectory(vm.Config.Files.LogDirectory)
	}
	st := t.state(ref)
	st.mu.Lock()
	defer st.mu.Unlock()
	for _, d := range st.disks {
		files = append(files, d.flatPath, d.descPath)
	}
	for _, s := range st.snaps {
		for _, d := range s.disks {
			files = append(files, d.flatPath, d.descPath)
		}
		files = append(files, s.vmsn)
	}
	return dir, files
}

// vmDirectory maps "[ds] dir" to its local directory, "" unless that lies strictly inside
// the datastore's directory (never the datastore itself).
func (t *tracker) vmDirectory(dsPath string) string {
	var p object.DatastorePath
	if !p.FromString(dsPath) {
		return ""
	}
	root, err := t.datastoreDir(p.Datastore)
	if err != nil || root == "" {
		return ""
	}
	dir := filepath.Join(root, filepath.FromSlash(p.Path))
	rel, err := filepath.Rel(root, dir)
	if err != nil || rel == "." || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
		return ""
	}
	return dir
}
