package cbtsim_test

import (
	"bytes"
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmware/govmomi/vim25/types"

	"sendense.io/e2e/vcsim-cbt/internal/cbtsim"
)

// With unsorted pages on, each page of QueryChangedDiskAreas holds the same areas and covers
// the same range as in order, but lists them out of order, the same way every time; off
// again, pages are sorted.
func TestUnsortedPages(t *testing.T) {
	e := start(t, func(c *cbtsim.Config) {
		c.DisksPerVM = 1
		c.PageSize = 10
	})
	bs := e.info.BlockSize
	vm := e.vmName()
	e.setCBT(true)
	base := e.snapshot("base")
	baseID := e.changeID(base, disk)
	e.removeSnapshot(base, false)
	req := cbtsim.FillRequest{Pattern: "fragmented", Seed: 5, Count: 35, Size: 4096, Offset: 3 * bs}
	if _, err := e.ctl.Fill(e.ctx, vm, disk, req); err != nil {
		t.Fatal(err)
	}
	var written []cbtsim.Extent
	for i := range int64(req.Count) {
		written = append(written, cbtsim.Extent{Offset: req.Offset + i*2*bs, Length: req.Size})
	}
	want := blocks(written, bs, 64*mib)
	snap := e.snapshot("after")

	// In order (the default), as a reference.
	sorted := map[int64]types.DiskChangeInfo{}
	for _, id := range []string{baseID, "*"} {
		got, pages := e.queryAll(snap, disk, 0, id)
		sameExtents(t, "sorted pages since "+id, got, want)
		if pages != 4 {
			t.Fatalf("35 areas in %d pages of 10", pages)
		}
	}
	for start := int64(0); start < 64*mib; {
		page, err := e.query(&snap, disk, start, baseID)
		if err != nil {
			t.Fatal(err)
		}
		sorted[start] = page
		start += page.Length
	}

	info, err := e.ctl.CBT(e.ctx, vm, cbtsim.CBTRequest{Unsorted: types.NewBool(true)})
	if err != nil || !info.UnsortedPages {
		t.Fatalf("unsorted on: %+v %v", info, err)
	}
	for start, ref := range sorted {
		page, err := e.query(&snap, disk, start, baseID)
		if err != nil {
			t.Fatal(err)
		}
		if page.StartOffset != ref.StartOffset || page.Length != ref.Length {
			t.Fatalf("page at %d covers [%d, +%d), in order it covered [%d, +%d)", start, page.StartOffset, page.Length, ref.StartOffset, ref.Length)
		}
		byStart := func(a, b types.DiskChangeExtent) int { return cmp.Compare(a.Start, b.Start) }
		if len(page.ChangedArea) >= 2 && slices.IsSortedFunc(page.ChangedArea, byStart) {
			t.Fatalf("page at %d is sorted: %+v", start, page.ChangedArea)
		}
		again, err := e.query(&snap, disk, start, baseID)
		if err != nil || !slices.Equal(again.ChangedArea, page.ChangedArea) {
			t.Fatalf("page at %d asked twice: %+v then %+v (%v)", start, page.ChangedArea, again.ChangedArea, err)
		}
		got := slices.SortedFunc(slices.Values(page.ChangedArea), byStart)
		if !slices.Equal(got, ref.ChangedArea) {
			t.Fatalf("page at %d: areas %+v, in order %+v", start, got, ref.ChangedArea)
		}
	}

	// Off again: every page in order (queryAll checks it).
	if info, err = e.ctl.CBT(e.ctx, vm, cbtsim.CBTRequest{Unsorted: types.NewBool(false)}); err != nil || info.UnsortedPages {
		t.Fatalf("unsorted off: %+v %v", info, err)
	}
	got, _ := e.queryAll(snap, disk, 0, baseID)
	sameExtents(t, "sorted again", got, want)
	if _, err := e.ctl.CBT(e.ctx, vm, cbtsim.CBTRequest{}); err == nil || !strings.Contains(err.Error(), "400") {
		t.Fatalf("an empty CBT request: %v", err)
	}
}

// A disk added to a live VM is like the others: a key, unit, label and file of its own, CBT
// with a uuid of its own, frozen by the next snapshot and absent from earlier ones, written,
// queried and hashed like the others.
func TestAddDisk(t *testing.T) {
	e := start(t, nil)
	vm := e.vmName()
	bs := e.info.BlockSize
	e.setCBT(true)
	before := e.snapshot("before") // adding a disk is allowed with snapshots, as on vSphere

	added, err := e.ctl.AddDisk(e.ctx, vm, 16*mib)
	if err != nil {
		t.Fatal(err)
	}
	if added.Key != 2002 || added.Capacity != 16*mib || added.FileName != "[LocalDS_0] cbt-vm-0/cbt-vm-0_2.vmdk" {
		t.Fatalf("added %+v", added)
	}
	uuids := map[string]bool{}
	for _, k := range []int32{2000, 2001, 2002} {
		uuids[cbtUUID(t, e.changeID(e.vm.Reference(), k))] = true
	}
	if len(uuids) != 3 || e.changeID(e.vm.Reference(), 2002) != added.ChangeID {
		t.Fatalf("CBT uuids of the three disks %v; added disk's changeId %q", uuids, added.ChangeID)
	}
	d := e.disks(e.vm.Reference())[2002]
	units := map[int32]bool{}
	for _, other := range e.disks(e.vm.Reference()) {
		units[*other.UnitNumber] = true
	}
	if d.DeviceInfo.GetDescription().Label != "Hard disk 3" || d.ControllerKey != cbtsim.ControllerKey || len(units) != 3 || units[7] {
		t.Fatalf("added disk label %q controller %d, units %v", d.DeviceInfo.GetDescription().Label, d.ControllerKey, units)
	}
	flat := e.flatPath(backing(d).FileName)
	if st, err := os.Stat(flat); err != nil || st.Size() != 16*mib || flat != added.FlatFile {
		t.Fatalf("flat file %s (listed %s): %v %v", flat, added.FlatFile, err, st)
	}
	if desc, err := os.ReadFile(e.descPath(backing(d).FileName)); err != nil || !bytes.Contains(desc, []byte(`"cbt-vm-0_2-flat.vmdk"`)) {
		t.Fatalf("descriptor: %v\n%s", err, desc)
	}

	w := cbtsim.Extent{Offset: 5*mib + 100, Length: 70_000}
	if _, err := e.ctl.Write(e.ctx, vm, 2002, w.Offset, bytes.Repeat([]byte{0x5A}, int(w.Length))); err != nil {
		t.Fatal(err)
	}
	after := e.snapshot("after")
	got, _ := e.queryAll(after, 2002, 0, added.ChangeID)
	sameExtents(t, "changes of the added disk since it was added", got, blocks([]cbtsim.Extent{w}, bs, 16*mib))
	got, _ = e.queryAll(after, 2002, 0, "*")
	sameExtents(t, `"*" of the added disk`, got, blocks([]cbtsim.Extent{w}, bs, 16*mib))
	_, err = e.query(&before, 2002, 0, "*")
	expectFault(t, "the added disk in a snapshot taken before", err, "InvalidArgument", "deviceKey")
	frozen, err := e.ctl.SnapshotChecksum(e.ctx, vm, "after", 2002)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 16*mib)
	copy(want[w.Offset:], bytes.Repeat([]byte{0x5A}, int(w.Length)))
	if sum := sha256.Sum256(want); frozen.SHA256 != hex.EncodeToString(sum[:]) || frozen.Capacity != 16*mib {
		t.Fatalf("snapshot checksum of the added disk %+v", frozen)
	}
	if live, err := e.ctl.Checksum(e.ctx, vm, 2002); err != nil || live.SHA256 != frozen.SHA256 {
		t.Fatalf("live checksum %+v %v", live, err)
	}

	// Keys, units and files go on; the controller's 15 disks are the limit; sizes are checked.
	next, err := e.ctl.AddDisk(e.ctx, vm, 1*mib)
	if err != nil || next.Key != 2003 || next.FileName != "[LocalDS_0] cbt-vm-0/cbt-vm-0_3.vmdk" {
		t.Fatalf("second added disk %+v %v", next, err)
	}
	for _, bad := range []int64{0, mib - 1024, mib + 1} {
		if _, err := e.ctl.AddDisk(e.ctx, vm, bad); err == nil || !strings.Contains(err.Error(), "400") {
			t.Fatalf("capacity %d: %v", bad, err)
		}
	}
	for range cbtsim.MaxDisksPerVM - 4 {
		if _, err := e.ctl.AddDisk(e.ctx, vm, mib); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.ctl.AddDisk(e.ctx, vm, mib); err == nil || !strings.Contains(err.Error(), "409") {
		t.Fatalf("a 16th disk: %v", err)
	}
	info, err := e.ctl.VM(e.ctx, vm)
	if err != nil || len(info.Disks) != cbtsim.MaxDisksPerVM {
		t.Fatalf("%d disks: %v", len(info.Disks), err)
	}
	if _, err := e.ctl.AddDisk(e.ctx, "no-such-vm", mib); err == nil || !strings.Contains(err.Error(), "404") {
		t.Fatalf("a disk for an unknown VM: %v", err)
	}
}

// With a query delay set, QueryChangedDiskAreas is answered only once the delay is lifted;
// meanwhile the call is counted as held and the control API still answers. The answer is the
// one given without a delay.
func TestQueryDelayHoldsTheCallUntilLifted(t *testing.T) {
	e := start(t, func(c *cbtsim.Config) { c.DisksPerVM = 1 })
	vm := e.vmName()
	e.setCBT(true)
	snap := e.snapshot("held")
	want, err := e.query(&snap, disk, 0, "*")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.ctl.CBT(e.ctx, vm, cbtsim.CBTRequest{QueryDelayMs: ptr(int64(-1))}); err == nil || !strings.Contains(err.Error(), "negative") {
		t.Fatalf("a negative delay: %v", err)
	}
	info, err := e.ctl.CBT(e.ctx, vm, cbtsim.CBTRequest{QueryDelayMs: ptr(int64(10 * 60 * 1000))})
	if err != nil || info.QueryDelayMs != 10*60*1000 || info.QueriesHeld != 0 {
		t.Fatalf("delay on: %+v %v", info, err)
	}
	type answer struct {
		info types.DiskChangeInfo
		err  error
	}
	answered := make(chan answer, 1)
	go func() {
		got, err := e.query(&snap, disk, 0, "*")
		answered <- answer{got, err}
	}()
	deadline := time.Now().Add(30 * time.Second)
	for {
		info, err := e.ctl.VM(e.ctx, vm)
		if err != nil {
			t.Fatal(err)
		}
		if info.QueriesHeld == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the query was never held: %+v", info)
		}
		time.Sleep(20 * time.Millisecond)
	}
	select {
	case a := <-answered:
		t.Fatalf("answered while held: %+v %v", a.info, a.err)
	default:
	}
	if info, err := e.ctl.CBT(e.ctx, vm, cbtsim.CBTRequest{QueryDelayMs: ptr(int64(0))}); err != nil || info.QueryDelayMs != 0 {
		t.Fatalf("delay off: %+v %v", info, err)
	}
	select {
	case a := <-answered:
		if a.err != nil || a.info.Length != want.Length || !slices.Equal(a.info.ChangedArea, want.ChangedArea) {
			t.Fatalf("held answer %+v %v, without a delay %+v", a.info, a.err, want)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the held query was not released when the delay was lifted")
	}
	if info, err := e.ctl.VM(e.ctx, vm); err != nil || info.QueriesHeld != 0 {
		t.Fatalf("after the answer: %+v %v", info, err)
	}
}

func ptr[T any](v T) *T { return &v }
