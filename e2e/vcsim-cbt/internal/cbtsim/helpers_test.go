package cbtsim_test

import (
	"bytes"
	"context"
	"errors"
	"log"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/session"
	"github.com/vmware/govmomi/task"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"

	"sendense.io/e2e/vcsim-cbt/internal/cbtsim"
)

// testTimeout bounds every network wait of one test.
const testTimeout = 90 * time.Second

// env is one simulator and a govmomi client logged in to it over https, trusting only
// the CA the simulator printed.
type env struct {
	t    *testing.T
	ctx  context.Context
	srv  *cbtsim.Server
	logs *syncBuffer // the server's log
	info cbtsim.Info
	ctl  *cbtsim.Client
	c    *vim25.Client
	vm   *object.VirtualMachine
	// expectPanics is the number of panics the test provokes on purpose; any other number
	// of panics the server survived fails the test.
	expectPanics int64
}

func start(t *testing.T, mod func(*cbtsim.Config)) *env {
	t.Helper()
	cfg := cbtsim.DefaultConfig()
	cfg.DatastoreDir = t.TempDir()
	logs := &syncBuffer{}
	cfg.Logger = log.New(logs, "", log.Lmicroseconds)
	if mod != nil {
		mod(&cfg)
	}
	srv, err := cbtsim.Start(cfg)
	if err != nil {
		t.Fatalf("start: %v", err)
	}
	t.Cleanup(srv.Close)
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	t.Cleanup(cancel)
	e := &env{t: t, ctx: ctx, srv: srv, logs: logs, info: srv.Info(), ctl: cbtsim.NewClient(srv.Info().ControlURL)}
	// Any panic the simulator survived is a bug, even when the test's own checks passed.
	t.Cleanup(func() {
		if n := srv.Panics(); n != e.expectPanics {
			t.Errorf("the simulator survived %d panics, expected %d; its log:\n%s", n, e.expectPanics, logs.String())
		}
		if got := int64(strings.Count(logs.String(), cbtsim.PanicMarker)); got != e.expectPanics {
			t.Errorf("%d %q lines in the simulator's log, expected %d:\n%s", got, cbtsim.PanicMarker, e.expectPanics, logs.String())
		}
	})
	e.c = e.login(e.info.Username, e.info.Password)
	vm, err := object.NewSearchIndex(e.c).FindByUuid(ctx, nil, e.info.VMs[0].InstanceUUID, true, types.NewBool(true))
	if err != nil || vm == nil {
		t.Fatalf("find VM by instance UUID %s: %v", e.info.VMs[0].InstanceUUID, err)
	}
	e.vm = object.NewVirtualMachine(e.c, vm.Reference())
	return e
}

func (e *env) login(user, pass string) *vim25.Client {
	e.t.Helper()
	c, err := e.tryLogin(user, pass)
	if err != nil {
		e.t.Fatalf("login: %v", err)
	}
	return c
}

func (e *env) tryLogin(user, pass string) (*vim25.Client, error) {
	u, err := soap.ParseURL(e.info.URL)
	if err != nil {
		return nil, err
	}
	sc := soap.NewClient(u, false)
	if err := sc.SetRootCAs(e.info.CAFile); err != nil {
		return nil, err
	}
	c, err := vim25.NewClient(e.ctx, sc)
	if err != nil {
		return nil, err
	}
	if err := session.NewManager(c).Login(e.ctx, url.UserPassword(user, pass)); err != nil {
		return nil, err
	}
	return c, nil
}

func (e *env) vmName() string { return e.info.VMs[0].Name }

func (e *env) reconfigure(spec types.VirtualMachineConfigSpec) {
	e.t.Helper()
	task, err := e.vm.Reconfigure(e.ctx, spec)
	if err == nil {
		err = task.Wait(e.ctx)
	}
	if err != nil {
		e.t.Fatalf("reconfigure: %v", err)
	}
}

func (e *env) setCBT(on bool) {
	e.t.Helper()
	e.reconfigure(types.VirtualMachineConfigSpec{ChangeTrackingEnabled: types.NewBool(on)})
}

func (e *env) snapshot(name string) types.ManagedObjectReference {
	e.t.Helper()
	task, err := e.vm.CreateSnapshot(e.ctx, name, "test", false, false)
	if err != nil {
		e.t.Fatalf("create snapshot %s: %v", name, err)
	}
	res, err := task.WaitForResult(e.ctx)
	if err != nil {
		e.t.Fatalf("create snapshot %s: %v", name, err)
	}
	return res.Result.(types.ManagedObjectReference)
}

func (e *env) removeSnapshot(ref types.ManagedObjectReference, children bool) {
	e.t.Helper()
	res, err := methods.RemoveSnapshot_Task(e.ctx, e.c, &types.RemoveSnapshot_Task{This: ref, RemoveChildren: children})
	if err == nil {
		err = object.NewTask(e.c, res.Returnval).Wait(e.ctx)
	}
	if err != nil {
		e.t.Fatalf("remove snapshot %s: %v", ref.Value, err)
	}
}

func (e *env) removeAllSnapshots() {
	e.t.Helper()
	task, err := e.vm.RemoveAllSnapshot(e.ctx, nil)
	if err == nil {
		err = task.Wait(e.ctx)
	}
	if err != nil {
		e.t.Fatalf("remove all snapshots: %v", err)
	}
}

// disks returns the virtual disks of a VM or snapshot as the PropertyCollector sees them.
func (e *env) disks(ref types.ManagedObjectReference) map[int32]*types.VirtualDisk {
	e.t.Helper()
	var devices []types.BaseVirtualDevice
	pc := property.DefaultCollector(e.c)
	switch ref.Type {
	case "VirtualMachine":
		var m mo.VirtualMachine
		if err := pc.RetrieveOne(e.ctx, ref, []string{"config.hardware.device"}, &m); err != nil {
			e.t.Fatalf("retrieve %s devices: %v", ref.Value, err)
		}
		devices = m.Config.Hardware.Device
	case "VirtualMachineSnapshot":
		var m mo.VirtualMachineSnapshot
		if err := pc.RetrieveOne(e.ctx, ref, []string{"config.hardware.device"}, &m); err != nil {
			e.t.Fatalf("retrieve %s devices: %v", ref.Value, err)
		}
		devices = m.Config.Hardware.Device
	}
	out := map[int32]*types.VirtualDisk{}
	for _, d := range devices {
		if disk, ok := d.(*types.VirtualDisk); ok {
			out[disk.Key] = disk
		}
	}
	return out
}

func backing(d *types.VirtualDisk) *types.VirtualDiskFlatVer2BackingInfo {
	return d.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
}

func (e *env) changeID(ref types.ManagedObjectReference, key int32) string {
	e.t.Helper()
	d := e.disks(ref)[key]
	if d == nil {
		e.t.Fatalf("%s has no disk %d", ref.Value, key)
	}
	return backing(d).ChangeId
}

var dsPathRE = regexp.MustCompile(`^\[([^\]]+)\] (.+)$`)

// flatPath maps a backing fileName to the raw data file the way the agent's nfs
// transport does, from the documented mapping alone: "[ds] d/x.vmdk" -> <ds dir>/d/x-flat.vmdk.
func (e *env) flatPath(fileName string) string {
	e.t.Helper()
	m := dsPathRE.FindStringSubmatch(fileName)
	if m == nil {
		e.t.Fatalf("not a datastore path: %q", fileName)
	}
	dir, ok := e.info.Datastores[m[1]]
	if !ok {
		e.t.Fatalf("datastore %q not in %v", m[1], e.info.Datastores)
	}
	return filepath.Join(dir, strings.TrimSuffix(m[2], ".vmdk")+"-flat.vmdk")
}

func (e *env) descPath(fileName string) string {
	m := dsPathRE.FindStringSubmatch(fileName)
	return filepath.Join(e.info.Datastores[m[1]], m[2])
}

func readAt(t *testing.T, path string, off int64, n int) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatalf("read %s at %d: %v", path, off, err)
	}
	return b
}

func (e *env) query(snap *types.ManagedObjectReference, key int32, start int64, changeID string) (types.DiskChangeInfo, error) {
	res, err := methods.QueryChangedDiskAreas(e.ctx, e.c, &types.QueryChangedDiskAreas{
		This: e.vm.Reference(), Snapshot: snap, DeviceKey: key, StartOffset: start, ChangeId: changeID,
	})
	if err != nil {
		return types.DiskChangeInfo{}, err
	}
	return res.Returnval, nil
}

// queryAll pages through QueryChangedDiskAreas like a careful client, checking every
// page's invariants, and returns the union of the areas and the number of pages.
func (e *env) queryAll(snap types.ManagedObjectReference, key int32, start int64, changeID string) ([]cbtsim.Extent, int) {
	e.t.Helper()
	capacity := diskCapacity(e.disks(snap)[key])
	var all []cbtsim.Extent
	pages := 0
	for start < capacity {
		info, err := e.query(&snap, key, start, changeID)
		if err != nil {
			e.t.Fatalf("QueryChangedDiskAreas(%s, %d, %d, %q): %v", snap.Value, key, start, changeID, err)
		}
		pages++
		if info.StartOffset != start || info.Length <= 0 || start+info.Length > capacity {
			e.t.Fatalf("page %d: startOffset %d length %d for a query at %d of a %d byte disk", pages, info.StartOffset, info.Length, start, capacity)
		}
		if len(info.ChangedArea) > e.info.PageSize {
			e.t.Fatalf("page %d has %d areas, more than the page size %d", pages, len(info.ChangedArea), e.info.PageSize)
		}
		prevEnd := start
		for _, a := range info.ChangedArea {
			if a.Start < prevEnd || a.Length <= 0 || a.Start+a.Length > start+info.Length {
				e.t.Fatalf("page %d: area [%d, %d) out of order or outside [%d, %d)", pages, a.Start, a.Start+a.Length, start, start+info.Length)
			}
			prevEnd = a.Start + a.Length
			all = append(all, cbtsim.Extent{Offset: a.Start, Length: a.Length})
		}
		start += info.Length
	}
	return merge(all), pages
}

func diskCapacity(d *types.VirtualDisk) int64 {
	if d.CapacityInBytes > 0 {
		return d.CapacityInBytes
	}
	return d.CapacityInKB * 1024
}

// merge sorts extents and joins overlapping or touching ones.
func merge(in []cbtsim.Extent) []cbtsim.Extent {
	ext := append([]cbtsim.Extent(nil), in...)
	sort.Slice(ext, func(i, j int) bool { return ext[i].Offset < ext[j].Offset })
	var out []cbtsim.Extent
	for _, x := range ext {
		if x.Length <= 0 {
			continue
		}
		if n := len(out); n > 0 && x.Offset <= out[n-1].Offset+out[n-1].Length {
			end := max(out[n-1].Offset+out[n-1].Length, x.Offset+x.Length)
			out[n-1].Length = end - out[n-1].Offset
			continue
		}
		out = append(out, x)
	}
	return out
}

// blocks rounds byte ranges out to whole blocks (clipped to capacity) and merges them:
// what CBT at that granularity must report.
func blocks(in []cbtsim.Extent, bs, capacity int64) []cbtsim.Extent {
	var out []cbtsim.Extent
	for _, x := range in {
		s := x.Offset / bs * bs
		end := min((x.Offset+x.Length+bs-1)/bs*bs, capacity)
		out = append(out, cbtsim.Extent{Offset: s, Length: end - s})
	}
	return merge(out)
}

func concat(lists ...[]cbtsim.Extent) []cbtsim.Extent {
	var out []cbtsim.Extent
	for _, l := range lists {
		out = append(out, l...)
	}
	return out
}

func sameExtents(t *testing.T, what string, got, want []cbtsim.Extent) {
	t.Helper()
	if reflect.DeepEqual(got, want) || (len(got) == 0 && len(want) == 0) {
		return
	}
	show := func(x []cbtsim.Extent) []cbtsim.Extent {
		if len(x) > 8 {
			return x[:8]
		}
		return x
	}
	t.Fatalf("%s: got %d extents %v..., want %d extents %v...", what, len(got), show(got), len(want), show(want))
}

// faultName returns the vim fault type of a SOAP fault error ("" if not a fault).
func faultName(err error) string {
	if err == nil || !soap.IsSoapFault(err) {
		return ""
	}
	f := soap.ToSoapFault(err).VimFault()
	if f == nil {
		return ""
	}
	return reflect.Indirect(reflect.ValueOf(f)).Type().Name()
}

func invalidProperty(err error) string {
	if err == nil || !soap.IsSoapFault(err) {
		return ""
	}
	switch f := soap.ToSoapFault(err).VimFault().(type) {
	case types.InvalidArgument:
		return f.InvalidProperty
	case *types.InvalidArgument:
		return f.InvalidProperty
	}
	return ""
}

func expectFault(t *testing.T, what string, err error, fault, property string) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: no fault, want %s", what, fault)
	}
	if got := faultName(err); got != fault {
		t.Fatalf("%s: fault %q (%v), want %s", what, got, err, fault)
	}
	if property != "" {
		if got := invalidProperty(err); got != property {
			t.Fatalf("%s: invalidProperty %q, want %q", what, got, property)
		}
	}
}

var changeIDRE = regexp.MustCompile(`^52( [0-9a-f]{2}){7}-[0-9a-f]{2}( [0-9a-f]{2}){7}/([0-9]+)$`)

func cbtUUID(t *testing.T, changeID string) string {
	t.Helper()
	if !changeIDRE.MatchString(changeID) {
		t.Fatalf("changeId %q is not in vCenter's \"<uuid>/<n>\" form", changeID)
	}
	return changeID[:strings.LastIndexByte(changeID, '/')]
}

// taskFault returns the fault a task failed with (nil if err is not a task's error).
func taskFault(err error) types.BaseMethodFault {
	var te task.Error
	if errors.As(err, &te) && te.LocalizedMethodFault != nil {
		return te.Fault()
	}
	return nil
}

func typeName(v any) string {
	if v == nil {
		return ""
	}
	return reflect.Indirect(reflect.ValueOf(v)).Type().Name()
}

// syncBuffer is a bytes.Buffer safe for the server's logger and the test to share.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
