package cbtsim_test

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"

	"sendense.io/e2e/vcsim-cbt/internal/cbtsim"
)

const (
	mib  = int64(1) << 20
	disk = int32(2000)
)

// The inventory, TLS and the disk files are what the startup line promises.
func TestInventoryTLSAndDiskFiles(t *testing.T) {
	e := start(t, nil)
	info := e.info
	if !strings.HasPrefix(info.URL, "https://") || !strings.HasSuffix(info.URL, "/sdk") {
		t.Fatalf("url %q", info.URL)
	}

	// The thumbprint is the served certificate's, and the certificate chains to the CA.
	pem, err := os.ReadFile(info.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		t.Fatal("no certificate in ca_file")
	}
	dialer := &tls.Dialer{NetDialer: &net.Dialer{Timeout: 10 * time.Second}, Config: &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"}}
	conn, err := dialer.DialContext(e.ctx, "tcp", info.Host)
	if err != nil {
		t.Fatalf("TLS handshake verified by the CA: %v", err)
	}
	peer := conn.(*tls.Conn).ConnectionState().PeerCertificates[0]
	_ = conn.Close()
	if got := soap.ThumbprintSHA256(peer); got != info.Thumbprint {
		t.Fatalf("served certificate thumbprint %s, printed %s", got, info.Thumbprint)
	}
	if got := soap.ThumbprintSHA1(peer); got != info.ThumbprintSHA1 {
		t.Fatalf("served certificate SHA-1 thumbprint %s, printed %s", got, info.ThumbprintSHA1)
	}

	// Only the printed credentials log in.
	if _, err := e.tryLogin(info.Username, info.Password+"x"); faultName(err) != "InvalidLogin" {
		t.Fatalf("wrong password: %v, want InvalidLogin", err)
	}

	// One VM, predictable, CBT off, two thin disks 2000 and 2001 of 64 MiB without changeId.
	if len(info.VMs) != 1 || info.VMs[0].Name != "cbt-vm-0" || info.VMs[0].InstanceUUID != "500c0000-0000-4000-8000-000000000001" {
		t.Fatalf("vms %+v", info.VMs)
	}
	var m mo.VirtualMachine
	if err := property.DefaultCollector(e.c).RetrieveOne(e.ctx, e.vm.Reference(), []string{"name", "config", "runtime.powerState"}, &m); err != nil {
		t.Fatal(err)
	}
	if m.Name != "cbt-vm-0" || m.Config.InstanceUuid != info.VMs[0].InstanceUUID || m.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOn {
		t.Fatalf("vm name %q instance uuid %q power %s", m.Name, m.Config.InstanceUuid, m.Runtime.PowerState)
	}
	if m.Config.ChangeTrackingEnabled != nil && *m.Config.ChangeTrackingEnabled {
		t.Fatal("CBT is on at startup")
	}
	disks := e.disks(e.vm.Reference())
	var keys []int32
	for k := range disks {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	if !slices.Equal(keys, []int32{2000, 2001}) {
		t.Fatalf("disk keys %v", keys)
	}
	for k, d := range disks {
		b := backing(d)
		if label := d.DeviceInfo.GetDescription().Label; label != "Hard disk "+string(rune('1'+k-2000)) {
			t.Fatalf("disk %d: label %q", k, label)
		}
		if d.CapacityInBytes != 64*mib || d.CapacityInKB != 64*1024 || b.ChangeId != "" {
			t.Fatalf("disk %d: capacity %d/%d KB changeId %q", k, d.CapacityInBytes, d.CapacityInKB, b.ChangeId)
		}
		flat := e.flatPath(b.FileName)
		st, err := os.Stat(flat)
		if err != nil || st.Size() != d.CapacityInBytes {
			t.Fatalf("disk %d: flat file %s: %v (size %v)", k, flat, err, st)
		}
		desc, err := os.ReadFile(e.descPath(b.FileName))
		if err != nil || !bytes.Contains(desc, []byte(`"`+filepath.Base(flat)+`"`)) {
			t.Fatalf("disk %d: descriptor does not name %s: %v\n%s", k, filepath.Base(flat), err, desc)
		}
	}
}

// 5,000 fragmented writes need several pages of areas; their union is exactly the
// written blocks.
func TestPagingFragmentedWrites(t *testing.T) {
	e := start(t, func(c *cbtsim.Config) {
		c.DisksPerVM = 1
		c.DiskSizes = []int64{1 << 30}
	})
	bs := e.info.BlockSize
	e.setCBT(true)
	base := e.snapshot("base")
	baseID := e.changeID(base, disk)
	e.removeSnapshot(base, false)

	// Each 4 KiB write straddles a block boundary (2 blocks); writes are 3 blocks apart.
	req := cbtsim.FillRequest{Pattern: "fragmented", Seed: 42, Count: 5000, Size: 4096, Offset: bs - 2048, Stride: 3 * bs}
	res, err := e.ctl.Fill(e.ctx, e.vmName(), disk, req)
	if err != nil {
		t.Fatal(err)
	}
	var written []cbtsim.Extent
	for i := range int64(req.Count) {
		written = append(written, cbtsim.Extent{Offset: req.Offset + i*req.Stride, Length: req.Size})
	}
	sameExtents(t, "extents the fill reports", res.Extents, written)
	want := blocks(written, bs, 1<<30)
	if len(want) != 5000 {
		t.Fatalf("test setup: %d expected areas, want 5000 non-adjacent ones", len(want))
	}

	snap := e.snapshot("after")
	got, pages := e.queryAll(snap, disk, 0, baseID)
	if pages < 3 {
		t.Fatalf("5000 areas came in %d pages of at most %d", pages, e.info.PageSize)
	}
	sameExtents(t, "changes since base", got, want)

	first, err := e.query(&snap, disk, 0, baseID)
	if err != nil {
		t.Fatal(err)
	}
	if len(first.ChangedArea) != e.info.PageSize || first.Length >= 1<<30 {
		t.Fatalf("first page: %d areas, length %d", len(first.ChangedArea), first.Length)
	}

	all, _ := e.queryAll(snap, disk, 0, "*")
	sameExtents(t, `changeId "*"`, all, want)
}

// The snapshot view keeps the data of the snapshot instant while the live disk changes.
func TestSnapshotFreezesContents(t *testing.T) {
	e := start(t, nil)
	e.setCBT(true)
	capacity := 64 * mib
	rng := rand.New(rand.NewPCG(1, 2))
	image := make([]byte, capacity) // what the disk 2000 must contain
	write := func(off int64, n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.IntN(256))
		}
		if _, err := e.ctl.Write(e.ctx, e.vmName(), disk, off, b); err != nil {
			t.Fatal(err)
		}
		copy(image[off:], b)
		return b
	}
	sum := func() string { s := sha256.Sum256(image); return hex.EncodeToString(s[:]) }

	off := 5*mib + 123
	a := write(off, 100_000)
	write(capacity-4096, 4096) // the very end of the disk
	other := []byte("disk 2001 content")
	if _, err := e.ctl.Write(e.ctx, e.vmName(), 2001, 0, other); err != nil {
		t.Fatal(err)
	}
	before := sum()
	live, err := e.ctl.Checksum(e.ctx, e.vmName(), disk)
	if err != nil {
		t.Fatal(err)
	}
	if live.SHA256 != before {
		t.Fatalf("live checksum %s, want %s", live.SHA256, before)
	}

	snap := e.snapshot("s1")
	snapDisks := e.disks(snap)
	liveDisks := e.disks(e.vm.Reference())
	frozen := e.flatPath(backing(snapDisks[disk]).FileName)
	if frozen == e.flatPath(backing(liveDisks[disk]).FileName) {
		t.Fatalf("snapshot and live disk share the file %s", frozen)
	}
	if backing(snapDisks[disk]).ChangeId == "" || backing(snapDisks[2001]).ChangeId == "" {
		t.Fatal("snapshot disk backings carry no changeId with CBT on")
	}
	if snapDisks[disk].CapacityInBytes != capacity {
		t.Fatalf("snapshot disk capacity %d", snapDisks[disk].CapacityInBytes)
	}

	// The live disk changes after the snapshot.
	c := write(off+50_000, 200_000)
	after := sum()
	if after == before {
		t.Fatal("test setup: the second write did not change the image")
	}
	live, err = e.ctl.Checksum(e.ctx, e.vmName(), disk)
	if err != nil {
		t.Fatal(err)
	}
	if live.SHA256 != after {
		t.Fatalf("live checksum after the write %s, want %s", live.SHA256, after)
	}
	atSnap, err := e.ctl.SnapshotChecksum(e.ctx, e.vmName(), snap.Value, disk)
	if err != nil {
		t.Fatal(err)
	}
	if atSnap.SHA256 != before {
		t.Fatalf("snapshot checksum %s changed with the live disk, want %s", atSnap.SHA256, before)
	}
	byName, err := e.ctl.SnapshotChecksum(e.ctx, e.vmName(), "s1", disk)
	if err != nil || byName.SHA256 != before {
		t.Fatalf("snapshot checksum by name: %v %v", byName, err)
	}

	// Reading the frozen file directly (the nfs transport's way) gives the old bytes.
	if got := readAt(t, frozen, off, len(a)); !bytes.Equal(got, a) {
		t.Fatal("frozen file does not hold the bytes written before the snapshot")
	}
	if got := readAt(t, e.flatPath(backing(liveDisks[disk]).FileName), off+50_000, len(c)); !bytes.Equal(got, c) {
		t.Fatal("live file does not hold the bytes written after the snapshot")
	}
	if got := readAt(t, e.flatPath(backing(snapDisks[2001]).FileName), 0, len(other)); !bytes.Equal(got, other) {
		t.Fatal("the one snapshot did not freeze disk 2001")
	}
	st, err := os.Stat(frozen)
	if err != nil || st.Size() != capacity {
		t.Fatalf("frozen file %s: %v size %v", frozen, err, st)
	}

	// The live changeId moved on; the snapshot's did not.
	if e.changeID(e.vm.Reference(), disk) == backing(snapDisks[disk]).ChangeId {
		t.Fatal("live changeId did not advance with a write after the snapshot")
	}
	if e.changeID(snap, disk) != backing(snapDisks[disk]).ChangeId {
		t.Fatal("snapshot changeId changed")
	}
}

// changeId semantics: "*", incrementals, zeros, stale IDs after CBT reset and resize.
func TestChangeIDs(t *testing.T) {
	e := start(t, nil)
	bs := e.info.BlockSize
	capacity := 64 * mib
	vm := e.vmName()
	write := func(off int64, n int) cbtsim.Extent {
		t.Helper()
		if _, err := e.ctl.Write(e.ctx, vm, disk, off, bytes.Repeat([]byte{0xA5}, n)); err != nil {
			t.Fatal(err)
		}
		return cbtsim.Extent{Offset: off, Length: int64(n)}
	}

	// CBT off: no changeId anywhere, and no change queries.
	w0 := write(0, 4096)
	off := e.snapshot("cbt-off")
	if id := e.changeID(off, disk); id != "" {
		t.Fatalf("changeId %q with CBT off", id)
	}
	_, err := e.query(&off, disk, 0, "*")
	expectFault(t, "query with CBT off", err, "FileFault", "")
	e.removeSnapshot(off, false)

	e.setCBT(true)
	live0, live1 := e.changeID(e.vm.Reference(), disk), e.changeID(e.vm.Reference(), 2001)
	if cbtUUID(t, live0) == cbtUUID(t, live1) {
		t.Fatal("two disks share a CBT uuid")
	}

	s1 := e.snapshot("s1")
	c1 := e.changeID(s1, disk)
	cbtUUID(t, c1)
	got, _ := e.queryAll(s1, disk, 0, "*")
	sameExtents(t, `"*" at s1 (written before CBT was on)`, got, blocks([]cbtsim.Extent{w0}, bs, capacity))
	got, _ = e.queryAll(s1, disk, 0, c1)
	sameExtents(t, "s1 against its own changeId", got, nil)

	// Changes between s1 and s2: two writes, one of them spanning blocks, and zeros.
	w2 := write(mib+100, 5000)
	// The live disk's changeId names the state right after w2: a query from it must
	// not report w2 (a writer that read it before w3 copied w2 already).
	afterW2 := e.changeID(e.vm.Reference(), disk)
	if afterW2 == c1 {
		t.Fatal("a write did not advance the live changeId")
	}
	w3 := write(3*bs-10, 20)
	zeroRes, err := e.ctl.Zero(e.ctx, vm, disk, 10*mib, 200*1024)
	if err != nil {
		t.Fatal(err)
	}
	z := cbtsim.Extent{Offset: 10 * mib, Length: 200 * 1024}
	if zeroRes.ChangeID == c1 {
		t.Fatal("a zero write did not advance the live changeId")
	}
	s2 := e.snapshot("s2")
	c2 := e.changeID(s2, disk)
	got, pages := e.queryAll(s2, disk, 0, c1)
	if pages != 1 {
		t.Fatalf("%d pages for a handful of areas", pages)
	}
	sameExtents(t, "incremental s1 -> s2", got, blocks([]cbtsim.Extent{w2, w3, z}, bs, capacity))
	got, _ = e.queryAll(s2, disk, 0, afterW2)
	sameExtents(t, "changes since the live changeId read after w2", got, blocks([]cbtsim.Extent{w3, z}, bs, capacity))
	got, _ = e.queryAll(s2, disk, 0, "*")
	sameExtents(t, `"*" at s2`, got, blocks([]cbtsim.Extent{w0, w2, w3, z}, bs, capacity))
	got, _ = e.queryAll(s2, 2001, 0, e.changeID(s1, 2001))
	sameExtents(t, "disk 2001 untouched", got, nil)

	// Paging from the middle of a changed block starts exactly there.
	mid := w2.Offset + 1000
	info, err := e.query(&s2, disk, mid, c1)
	if err != nil {
		t.Fatal(err)
	}
	if len(info.ChangedArea) == 0 || info.ChangedArea[0].Start != mid || info.StartOffset+info.Length != capacity {
		t.Fatalf("query from %d: %+v", mid, info)
	}

	// Faults.
	_, err = e.query(&s1, disk, 0, c2)
	expectFault(t, "changeId ahead of the snapshot", err, "InvalidArgument", "changeId")
	_, err = e.query(&s2, disk, 0, e.changeID(s2, 2001))
	expectFault(t, "changeId of another disk", err, "InvalidArgument", "changeId")
	_, err = e.query(&s2, disk, 0, "not a change id")
	expectFault(t, "malformed changeId", err, "InvalidArgument", "changeId")
	_, err = e.query(nil, disk, 0, "*")
	expectFault(t, "no snapshot", err, "InvalidArgument", "snapshot")
	_, err = e.query(&s2, disk, capacity, "*")
	expectFault(t, "startOffset at capacity", err, "InvalidArgument", "startOffset")
	_, err = e.query(&s2, disk, -1, "*")
	expectFault(t, "negative startOffset", err, "InvalidArgument", "startOffset")
	_, err = e.query(&s2, 2099, 0, "*")
	expectFault(t, "unknown device key", err, "InvalidArgument", "deviceKey")

	// CBT reset: earlier changeIds are stale; "*" still reports what is allocated.
	if _, err := e.ctl.CBT(e.ctx, vm, cbtsim.CBTRequest{Reset: true}); err != nil {
		t.Fatal(err)
	}
	s3 := e.snapshot("s3")
	c3 := e.changeID(s3, disk)
	if cbtUUID(t, c3) == cbtUUID(t, c2) {
		t.Fatal("CBT reset kept the uuid")
	}
	_, err = e.query(&s3, disk, 0, c2)
	expectFault(t, "changeId from before a CBT reset", err, "InvalidArgument", "changeId")
	got, _ = e.queryAll(s3, disk, 0, "*")
	sameExtents(t, `"*" after reset`, got, blocks([]cbtsim.Extent{w0, w2, w3, z}, bs, capacity))
	w4 := write(20*mib, 1)
	s4 := e.snapshot("s4")
	got, _ = e.queryAll(s4, disk, 0, c3)
	sameExtents(t, "incremental after reset", got, blocks([]cbtsim.Extent{w4}, bs, capacity))
	c4, c4other := e.changeID(s4, disk), e.changeID(s4, 2001)

	// Resize (control API): refused with snapshots; grows the file; stale changeIds.
	if _, err := e.ctl.Resize(e.ctx, vm, disk, 96*mib); err == nil {
		t.Fatal("resize with snapshots succeeded")
	}
	e.removeAllSnapshots()
	if _, err := e.ctl.Resize(e.ctx, vm, disk, 96*mib); err != nil {
		t.Fatal(err)
	}
	s5 := e.snapshot("s5")
	if got := e.disks(s5)[disk].CapacityInBytes; got != 96*mib {
		t.Fatalf("capacity after resize %d", got)
	}
	for _, ref := range []types.ManagedObjectReference{s5, e.vm.Reference()} {
		if st, err := os.Stat(e.flatPath(backing(e.disks(ref)[disk]).FileName)); err != nil || st.Size() != 96*mib {
			t.Fatalf("%s flat file after resize: %v %v", ref.Value, err, st)
		}
	}
	_, err = e.query(&s5, disk, 0, c4)
	expectFault(t, "changeId from before a resize", err, "InvalidArgument", "changeId")
	got, _ = e.queryAll(s5, disk, 0, "*")
	sameExtents(t, `"*" after resize`, got, blocks([]cbtsim.Extent{w0, w2, w3, z, w4}, bs, 96*mib))
	if cbtUUID(t, e.changeID(s5, 2001)) != cbtUUID(t, c4other) {
		t.Fatal("resizing disk 2000 reset disk 2001's CBT")
	}

	// Resize through ReconfigVM_Task, as a vSphere client would, resets CBT too.
	e.removeAllSnapshots()
	before := e.changeID(e.vm.Reference(), disk)
	d := e.disks(e.vm.Reference())[disk]
	d.CapacityInBytes, d.CapacityInKB = 128*mib, 128*1024
	e.reconfigure(types.VirtualMachineConfigSpec{DeviceChange: []types.BaseVirtualDeviceConfigSpec{
		&types.VirtualDeviceConfigSpec{Operation: types.VirtualDeviceConfigSpecOperationEdit, Device: d},
	}})
	afterID := e.changeID(e.vm.Reference(), disk)
	if cbtUUID(t, afterID) == cbtUUID(t, before) {
		t.Fatal("ReconfigVM disk extension kept the CBT uuid")
	}
	if st, err := os.Stat(e.flatPath(backing(d).FileName)); err != nil || st.Size() != 128*mib {
		t.Fatalf("flat file after ReconfigVM extension: %v %v", err, st)
	}

	// CBT off again: backings lose their changeId, queries fault.
	e.setCBT(false)
	if id := e.changeID(e.vm.Reference(), disk); id != "" {
		t.Fatalf("changeId %q after disabling CBT", id)
	}
	s6 := e.snapshot("s6")
	_, err = e.query(&s6, disk, 0, "*")
	expectFault(t, "query after disabling CBT", err, "FileFault", "")
}

// Snapshots are exactly the ones created; removing one deletes its frozen files.
func TestSnapshotRemovalDeletesFrozenFiles(t *testing.T) {
	e := start(t, nil)
	e.setCBT(true)
	vmDir := filepath.Dir(e.flatPath(backing(e.disks(e.vm.Reference())[disk]).FileName))
	liveFiles := listDir(t, vmDir)

	files := func(snap types.ManagedObjectReference) []string {
		var out []string
		for _, d := range e.disks(snap) {
			b := backing(d)
			out = append(out, e.flatPath(b.FileName), e.descPath(b.FileName))
		}
		return out
	}
	exist := func(what string, paths []string, want bool) {
		t.Helper()
		for _, p := range paths {
			_, err := os.Stat(p)
			if want && err != nil || !want && !os.IsNotExist(err) {
				t.Fatalf("%s: %s exists=%v (err %v)", what, p, !want, err)
			}
		}
	}
	tree := func() []string {
		t.Helper()
		var m mo.VirtualMachine
		if err := property.DefaultCollector(e.c).RetrieveOne(e.ctx, e.vm.Reference(), []string{"snapshot"}, &m); err != nil {
			t.Fatal(err)
		}
		var names []string
		var walk func([]types.VirtualMachineSnapshotTree)
		walk = func(n []types.VirtualMachineSnapshotTree) {
			for _, s := range n {
				names = append(names, s.Name)
				walk(s.ChildSnapshotList)
			}
		}
		if m.Snapshot != nil {
			walk(m.Snapshot.RootSnapshotList)
		}
		sort.Strings(names)
		return names
	}

	s1 := e.snapshot("s1")
	s2 := e.snapshot("s2")
	f1, f2 := files(s1), files(s2)
	if len(f1) != 4 || len(f2) != 4 {
		t.Fatalf("frozen files %v %v", f1, f2)
	}
	exist("s1", f1, true)
	exist("s2", f2, true)
	if got := tree(); !slices.Equal(got, []string{"s1", "s2"}) {
		t.Fatalf("snapshot tree %v", got)
	}
	listed, err := e.ctl.Snapshots(e.ctx, e.vmName())
	if err != nil || len(listed) != 2 || listed[0].Name != "s1" || listed[1].Name != "s2" {
		t.Fatalf("control API snapshots %+v %v", listed, err)
	}

	e.removeSnapshot(s1, false)
	exist("removed s1", f1, false)
	exist("kept s2", f2, true)
	if got := tree(); !slices.Equal(got, []string{"s2"}) {
		t.Fatalf("snapshot tree after removing s1: %v", got)
	}
	_, err = e.query(&s1, disk, 0, "*")
	expectFault(t, "query a removed snapshot", err, "ManagedObjectNotFound", "")
	if _, err := e.ctl.SnapshotChecksum(e.ctx, e.vmName(), s1.Value, disk); err == nil {
		t.Fatal("checksum of a removed snapshot succeeded")
	}

	// Removing a snapshot with its children drops the children's files too.
	s3 := e.snapshot("s3") // child of s2
	f3 := files(s3)
	exist("s3", f3, true)
	e.removeSnapshot(s2, true)
	exist("removed s2", f2, false)
	exist("removed child s3", f3, false)
	if got := tree(); len(got) != 0 {
		t.Fatalf("snapshot tree after removing s2 with children: %v", got)
	}

	s4, s5 := e.snapshot("s4"), e.snapshot("s5")
	f45 := append(files(s4), files(s5)...)
	exist("s4, s5", f45, true)
	e.removeAllSnapshots()
	exist("after RemoveAllSnapshots", f45, false)
	if got := tree(); len(got) != 0 {
		t.Fatalf("snapshot tree after RemoveAllSnapshots: %v", got)
	}
	if got := listDir(t, vmDir); !slices.Equal(got, liveFiles) {
		t.Fatalf("VM directory after removing every snapshot:\n%v\nwant\n%v", got, liveFiles)
	}
	if listed, err := e.ctl.Snapshots(e.ctx, e.vmName()); err != nil || len(listed) != 0 {
		t.Fatalf("control API snapshots after removal: %+v %v", listed, err)
	}
}

func listDir(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

// Fill patterns are deterministic in their seed, stay in range and are reported exactly.
func TestFillPatterns(t *testing.T) {
	e := start(t, func(c *cbtsim.Config) { c.VMs = 2 })
	if len(e.info.VMs) != 2 || e.info.VMs[1].Name != "cbt-vm-1" || e.info.VMs[1].Disks[1].Key != 2001 {
		t.Fatalf("vms %+v", e.info.VMs)
	}
	capacity := 64 * mib
	for _, p := range []cbtsim.FillRequest{
		{Pattern: "random", Seed: 7, Count: 300, Size: 3000, Offset: mib, Length: 8 * mib, Align: 4096},
		{Pattern: "sequential", Seed: 8, Count: 10, Size: 100_000, Offset: 30 * mib},
		{Pattern: "fragmented", Seed: 9, Count: 50, Size: 512, Offset: 40 * mib, Stride: 5000},
	} {
		var sums []string
		for _, vm := range []string{"cbt-vm-0", "cbt-vm-1"} {
			res, err := e.ctl.Fill(e.ctx, vm, disk, p)
			if err != nil {
				t.Fatalf("%s: %v", p.Pattern, err)
			}
			if len(res.Extents) != p.Count || res.Bytes != int64(p.Count)*p.Size {
				t.Fatalf("%s: %d extents, %d bytes", p.Pattern, len(res.Extents), res.Bytes)
			}
			for i, x := range res.Extents {
				lo, hi := p.Offset, capacity
				if p.Length > 0 {
					hi = p.Offset + p.Length
				}
				if x.Length != p.Size || x.Offset < lo || x.Offset+x.Length > hi {
					t.Fatalf("%s: extent %d %+v outside [%d, %d)", p.Pattern, i, x, lo, hi)
				}
				if p.Pattern == "sequential" && x.Offset != p.Offset+int64(i)*p.Size ||
					p.Pattern == "fragmented" && x.Offset != p.Offset+int64(i)*p.Stride ||
					p.Pattern == "random" && x.Offset%p.Align != 0 {
					t.Fatalf("%s: extent %d at %d", p.Pattern, i, x.Offset)
				}
			}
			cs, err := e.ctl.Checksum(e.ctx, vm, disk)
			if err != nil {
				t.Fatal(err)
			}
			sums = append(sums, cs.SHA256)
		}
		if sums[0] != sums[1] {
			t.Fatalf("%s: the same seed wrote different data on two VMs", p.Pattern)
		}
	}
	if _, err := e.ctl.Fill(e.ctx, "cbt-vm-0", disk, cbtsim.FillRequest{Pattern: "sequential", Count: 2, Size: 1 << 20, Offset: capacity - 1<<20}); err == nil {
		t.Fatal("a fill beyond the end of the disk succeeded")
	}
	if _, err := e.ctl.Write(e.ctx, "no-such-vm", disk, 0, []byte{1}); err == nil || !strings.Contains(err.Error(), "404") {
		t.Fatalf("write to an unknown VM: %v", err)
	}

	// A snapshot of another VM is not a valid argument.
	if _, err := e.ctl.CBT(e.ctx, "cbt-vm-1", cbtsim.CBTRequest{Enabled: types.NewBool(true)}); err != nil {
		t.Fatal(err)
	}
	other, err := e.ctl.VM(e.ctx, "cbt-vm-1")
	if err != nil || !other.CBT {
		t.Fatalf("cbt-vm-1 after enabling CBT: %+v %v", other, err)
	}
	e.setCBT(true) // on cbt-vm-0 too: the snapshot is the only thing wrong below
	vm0 := e.vm
	e.vm = object.NewVirtualMachine(e.c, types.ManagedObjectReference{Type: "VirtualMachine", Value: other.Moref})
	snap := e.snapshot("of-vm-1")
	e.vm = vm0
	_, err = e.query(&snap, disk, 0, "*")
	expectFault(t, "snapshot of another VM", err, "InvalidArgument", "snapshot")
}
