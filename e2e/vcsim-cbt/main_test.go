package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"syscall"
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

// serveEnv makes the test binary the simulator itself (main), so that a test can stop and
// resume a real process.
const serveEnv = "VCSIM_CBT_TEST_SERVE"

func TestMain(m *testing.M) {
	if os.Getenv(serveEnv) == "1" {
		main() // exits
	}
	os.Exit(m.Run())
}

// The real entry point: `serve` prints one JSON line, the CLI drives the control API,
// and the server stops on cancellation (SIGINT/SIGTERM in main) keeping its files.
func TestServeAndCLI(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pr, pw := io.Pipe()
	var stderr syncBuffer
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"serve", "-datastore-dir", dir, "-disk-size", "32MiB,48MiB", "-block-size", "4KiB", "-page-size", "10"}, nil, pw, &stderr)
		_ = pw.Close()
	}()
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		if sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
		_, _ = io.Copy(io.Discard, pr)
	}()
	var line string
	select {
	case l, ok := <-lines:
		if !ok {
			t.Fatalf("serve printed nothing; exit %v; stderr:\n%s", <-done, stderr.String())
		}
		line = l
	case <-time.After(90 * time.Second):
		t.Fatalf("no startup line within 90s; stderr:\n%s", stderr.String())
	}

	var info cbtsim.Info
	dec := json.NewDecoder(strings.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&info); err != nil {
		t.Fatalf("startup line %q: %v", line, err)
	}
	if !strings.HasPrefix(info.URL, "https://127.0.0.1:") || info.Username == "" || info.Password == "" ||
		len(info.Thumbprint) != 95 || info.DatastoreDir != dir || info.Datastores["LocalDS_0"] != filepath.Join(dir, "LocalDS_0") ||
		!strings.HasPrefix(info.ControlURL, "http://127.0.0.1:") || info.BlockSize != 4096 || info.PageSize != 10 {
		t.Fatalf("startup info %+v", info)
	}
	vm := info.VMs[0]
	if len(vm.Disks) != 2 || vm.Disks[0].Key != 2000 || vm.Disks[0].Capacity != 32<<20 || vm.Disks[1].Key != 2001 || vm.Disks[1].Capacity != 48<<20 {
		t.Fatalf("disks %+v", vm.Disks)
	}

	cli := func(stdin string, args ...string) (string, int) {
		t.Helper()
		var out, errOut bytes.Buffer
		cctx, ccancel := context.WithTimeout(ctx, 60*time.Second)
		defer ccancel()
		code := run(cctx, append(args, "-control", info.ControlURL), strings.NewReader(stdin), &out, &errOut)
		if code != 0 {
			return errOut.String(), code
		}
		return out.String(), 0
	}
	must := func(v any, stdin string, args ...string) {
		t.Helper()
		out, code := cli(stdin, args...)
		if code != 0 {
			t.Fatalf("vcsim-cbt %v: exit %d: %s", args, code, out)
		}
		if v != nil {
			if err := json.Unmarshal([]byte(out), v); err != nil {
				t.Fatalf("vcsim-cbt %v: output %q: %v", args, out, err)
			}
		}
	}

	var vmInfo cbtsim.VMInfo
	must(&vmInfo, "", "cbt", "-vm", vm.Name, "-enable")
	if !vmInfo.CBT || vmInfo.Disks[0].ChangeID == "" {
		t.Fatalf("after cbt -enable: %+v", vmInfo)
	}
	var wr cbtsim.WriteResult
	must(&wr, "", "write", "-vm", vm.InstanceUUID, "-offset", "4096", "-hex", "deadbeef")
	flat := vm.Disks[0].FlatFile
	if got := readFile(t, flat)[4096:4100]; !bytes.Equal(got, []byte{0xde, 0xad, 0xbe, 0xef}) {
		t.Fatalf("bytes at 4096: %x", got)
	}
	must(&wr, "from stdin", "write", "-vm", vm.Moref, "-disk", "2001", "-offset", "1M", "-file", "-")
	if got := readFile(t, vm.Disks[1].FlatFile)[1<<20 : 1<<20+10]; string(got) != "from stdin" {
		t.Fatalf("bytes at 1 MiB of disk 2001: %q", got)
	}
	must(&wr, "", "fill", "-pattern", "fragmented", "-count", "10", "-size", "4K", "-offset", "64K")
	if len(wr.Extents) != 10 || wr.Extents[9].Offset != 64<<10+9*8192 {
		t.Fatalf("fill: %+v", wr)
	}
	must(&wr, "", "zero", "-offset", "4096", "-length", "4")
	if got := readFile(t, flat)[4096:4100]; !bytes.Equal(got, make([]byte, 4)) {
		t.Fatalf("bytes at 4096 after zero: %x", got)
	}
	var cs cbtsim.ChecksumResult
	must(&cs, "", "checksum")
	sum := sha256.Sum256(readFile(t, flat))
	if cs.SHA256 != hex.EncodeToString(sum[:]) || cs.Capacity != 32<<20 {
		t.Fatalf("checksum %+v, file sha256 %x", cs, sum)
	}
	before := slices.Clone(vmInfo.Disks)
	must(&vmInfo, "", "cbt", "-reset", "-disk", "2001")
	if vmInfo.Disks[0].ChangeID == before[0].ChangeID && vmInfo.Disks[1].ChangeID == before[1].ChangeID {
		t.Fatal("cbt -reset changed nothing")
	}
	if uuid(vmInfo.Disks[1].ChangeID) == uuid(before[1].ChangeID) || uuid(vmInfo.Disks[0].ChangeID) != uuid(before[0].ChangeID) {
		t.Fatalf("cbt -reset -disk 2001: %v -> %v", before, vmInfo.Disks)
	}
	must(&vmInfo, "", "resize", "-disk", "2001", "-capacity", "64M")
	if vmInfo.Disks[1].Capacity != 64<<20 {
		t.Fatalf("after resize: %+v", vmInfo.Disks[1])
	}
	if st, err := os.Stat(vm.Disks[1].FlatFile); err != nil || st.Size() != 64<<20 {
		t.Fatalf("flat file after resize: %v %v", err, st)
	}
	must(&vmInfo, "", "cbt", "-unsorted")
	if !vmInfo.UnsortedPages {
		t.Fatalf("after cbt -unsorted: %+v", vmInfo)
	}
	must(&vmInfo, "", "cbt", "-unsorted=false")
	if vmInfo.UnsortedPages {
		t.Fatalf("after cbt -unsorted=false: %+v", vmInfo)
	}
	var added cbtsim.DiskInfo
	must(&added, "", "add-disk", "-capacity", "8M")
	if added.Key != 2002 || added.Capacity != 8<<20 || added.ChangeID == "" {
		t.Fatalf("add-disk: %+v", added)
	}
	if st, err := os.Stat(added.FlatFile); err != nil || st.Size() != 8<<20 {
		t.Fatalf("added disk's flat file: %v %v", err, st)
	}
	must(&wr, "", "write", "-disk", "2002", "-offset", "1M", "-data", "new disk")
	must(&cs, "", "checksum", "-disk", "2002")
	if sum := sha256.Sum256(readFile(t, added.FlatFile)); cs.SHA256 != hex.EncodeToString(sum[:]) {
		t.Fatalf("checksum of the added disk %+v, file sha256 %x", cs, sum)
	}
	var snaps []cbtsim.SnapshotInfo
	must(&snaps, "", "snapshots")
	if len(snaps) != 0 {
		t.Fatalf("snapshots %+v", snaps)
	}
	var vms []cbtsim.VMInfo
	must(&vms, "", "vms")
	if len(vms) != 1 || vms[0].Name != vm.Name {
		t.Fatalf("vms %+v", vms)
	}
	if out, code := cli("", "checksum", "-snapshot", "nosuch"); code == 0 || !strings.Contains(out, "404") {
		t.Fatalf("checksum of a missing snapshot: exit %d %s", code, out)
	}
	if _, code := cli("", "frobnicate"); code == 0 {
		t.Fatal("unknown command succeeded")
	}

	// A second server refuses the same, non-empty datastore directory.
	var errOut bytes.Buffer
	sctx, scancel := context.WithTimeout(ctx, 30*time.Second) // were it to start, it would serve until then
	code := run(sctx, []string{"serve", "-datastore-dir", dir}, nil, io.Discard, &errOut)
	scancel()
	if code == 0 || !strings.Contains(errOut.String(), "not empty") {
		t.Fatalf("second serve on the same directory: exit %d: %s", code, errOut.String())
	}

	cancel()
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("serve exit %d: %s", code, stderr.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("serve did not stop within 30s of cancellation")
	}
	if _, err := os.Stat(flat); err != nil {
		t.Fatalf("disk file gone after shutdown: %v", err)
	}
}

func uuid(changeID string) string { return changeID[:strings.LastIndexByte(changeID, '/')] }

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
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

// A simulator process stopped (SIGSTOP) and resumed (SIGCONT): a RemoveSnapshot_Task whose
// client gave up while the process was stopped and four retries of it from other sessions
// all reach the simulator at once on resume. The process survives: one of them removes the
// snapshot, each other is a task failed with TaskInProgress or the call's
// ManagedObjectNotFound, and the simulator keeps serving. (Before, the second removal of
// the snapshot ended the process with a nil pointer dereference, in about one run of four:
// the order in which the resumed process takes the calls varies. The in-process tests in
// internal/cbtsim hold tasks to reproduce each case every time.)
func TestStoppedAndResumedProcessAnswersRepeatedRemovals(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.Command(os.Args[0], "serve", "-datastore-dir", t.TempDir())
	cmd.Env = append(os.Environ(), serveEnv+"=1")
	var stderr syncBuffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGCONT)
		_ = cmd.Process.Kill()
		<-exited
	}()
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		if sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
		_, _ = io.Copy(io.Discard, stdout)
	}()
	var info cbtsim.Info
	select {
	case line := <-lines:
		if err := json.Unmarshal([]byte(line), &info); err != nil {
			t.Fatalf("startup line %q: %v; stderr:\n%s", line, err, stderr.String())
		}
	case <-time.After(90 * time.Second):
		t.Fatalf("no startup line within 90s; stderr:\n%s", stderr.String())
	}

	// Five sessions, each with its connection open before the stop.
	const retries = 4
	var clients []*vim25.Client
	for range 1 + retries {
		clients = append(clients, login(ctx, t, info))
	}
	c := clients[0]
	found, err := object.NewSearchIndex(c).FindByUuid(ctx, nil, info.VMs[0].InstanceUUID, true, types.NewBool(true))
	if err != nil || found == nil {
		t.Fatalf("find the VM: %v", err)
	}
	vm := object.NewVirtualMachine(c, found.Reference())
	created, err := vm.CreateSnapshot(ctx, "s1", "", false, false)
	if err != nil {
		t.Fatal(err)
	}
	res, err := created.WaitForResult(ctx)
	if err != nil {
		t.Fatalf("create snapshot: %v", err)
	}
	snap := res.Result.(types.ManagedObjectReference)
	remove := &types.RemoveSnapshot_Task{This: snap}

	if err := cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	waitStopped(t, cmd.Process.Pid) // kill(2) returns before the threads have stopped
	short, cancelShort := context.WithTimeout(ctx, time.Second)
	_, err = methods.RemoveSnapshot_Task(short, clients[0], remove)
	cancelShort()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("RemoveSnapshot_Task to a stopped process: %v, want the client's deadline", err)
	}
	outcomes := make(chan string, retries)
	for _, retry := range clients[1:] {
		go func() {
			res, err := methods.RemoveSnapshot_Task(ctx, retry, remove)
			if err != nil {
				outcomes <- describe(err) + " (call)"
				return
			}
			if _, err := object.NewTask(retry, res.Returnval).WaitForResult(ctx); err != nil {
				outcomes <- describe(err) + " (task)"
				return
			}
			outcomes <- "success"
		}()
	}
	time.Sleep(2 * time.Second) // the retries are sent and wait, like the abandoned call
	if err := cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	successes := 0
	for range retries {
		select {
		case o := <-outcomes:
			switch o {
			case "success":
				successes++
			case "TaskInProgress (task)", "ManagedObjectNotFound (call)":
			default:
				t.Fatalf("a retried RemoveSnapshot_Task after the resume: %s; stderr:\n%s", o, stderr.String())
			}
			t.Logf("a retry: %s", o)
		case err := <-exited:
			t.Fatalf("the simulator exited on resume: %v; stderr:\n%s", err, stderr.String())
		case <-ctx.Done():
			t.Fatal("the retries were not answered")
		}
	}
	if successes > 1 {
		t.Fatalf("%d retries removed the snapshot", successes)
	}

	// The snapshot is gone (removed by the abandoned call or a retry), and the simulator
	// keeps serving.
	if _, err := methods.RemoveSnapshot_Task(ctx, c, remove); vimFaultName(err) != "ManagedObjectNotFound" {
		t.Fatalf("RemoveSnapshot_Task of the removed snapshot: %v, want ManagedObjectNotFound", err)
	}
	var m mo.VirtualMachine
	if err := property.DefaultCollector(c).RetrieveOne(ctx, vm.Reference(), []string{"snapshot"}, &m); err != nil || m.Snapshot != nil {
		t.Fatalf("the VM's snapshots after the resume: %+v, %v", m.Snapshot, err)
	}
	created, err = vm.CreateSnapshot(ctx, "s2", "", false, false)
	if err == nil {
		res, err = created.WaitForResult(ctx)
	}
	if err != nil {
		t.Fatalf("create a snapshot after the resume: %v", err)
	}
	removed, err := methods.RemoveSnapshot_Task(ctx, c, &types.RemoveSnapshot_Task{This: res.Result.(types.ManagedObjectReference)})
	if err == nil {
		err = object.NewTask(c, removed.Returnval).Wait(ctx)
	}
	if err != nil {
		t.Fatalf("remove it: %v", err)
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		exited <- err // for the deferred cleanup
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v; stderr:\n%s", err, stderr.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no exit within 30s of SIGTERM")
	}
	if strings.Contains(stderr.String(), cbtsim.PanicMarker) {
		t.Fatalf("the simulator logged a panic:\n%s", stderr.String())
	}
}

// waitStopped waits until every thread of process pid is stopped ("T" in /proc).
func waitStopped(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		stopped := true
		stats, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", pid))
		for _, stat := range stats {
			b, err := os.ReadFile(stat)
			// "<tid> (<comm>) <state> ...": the state follows the last ')'
			if i := bytes.LastIndexByte(b, ')'); err == nil && (i < 0 || i+2 >= len(b) || b[i+2] != 'T') {
				stopped = false
			}
		}
		if stopped && len(stats) > 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %d not stopped 10s after SIGSTOP", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func login(ctx context.Context, t *testing.T, info cbtsim.Info) *vim25.Client {
	t.Helper()
	u, err := soap.ParseURL(info.URL)
	if err != nil {
		t.Fatal(err)
	}
	sc := soap.NewClient(u, false)
	if err := sc.SetRootCAs(info.CAFile); err != nil {
		t.Fatal(err)
	}
	c, err := vim25.NewClient(ctx, sc)
	if err == nil {
		err = session.NewManager(c).Login(ctx, url.UserPassword(info.Username, info.Password))
	}
	if err != nil {
		t.Fatalf("login: %v", err)
	}
	return c
}

// describe names a vim fault by its type, other errors by their text.
func describe(err error) string {
	if name := vimFaultName(err); name != "" {
		return name
	}
	return err.Error()
}

// vimFaultName is the vim fault type of a SOAP fault or of a task's error ("" for others).
func vimFaultName(err error) string {
	var f any
	var te task.Error
	switch {
	case errors.As(err, &te) && te.LocalizedMethodFault != nil:
		f = te.Fault()
	case err != nil && soap.IsSoapFault(err):
		f = soap.ToSoapFault(err).VimFault()
	}
	if f == nil {
		return ""
	}
	return reflect.Indirect(reflect.ValueOf(f)).Type().Name()
}
