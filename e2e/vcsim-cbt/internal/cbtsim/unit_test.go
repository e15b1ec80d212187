package cbtsim

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"

	"github.com/vmware/govmomi/vim25/types"
)

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"512": 512, "64MiB": 64 << 20, "64M": 64 << 20, "1g": 1 << 30, "4KiB": 4096, "2T": 2 << 40, " 7b ": 7} {
		got, err := ParseSize(in)
		if err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "x", "-1", "1.5G", "99999999999T"} {
		if _, err := ParseSize(in); err == nil {
			t.Errorf("ParseSize(%q) succeeded", in)
		}
	}
}

// changedAreas pages so that consecutive calls cover the disk exactly once.
func TestChangedAreasPaging(t *testing.T) {
	const bs, capacity = 10, 1005 // last block is partial
	changed := map[int64]bool{0: true, 1: true, 3: true, 7: true, 8: true, 9: true, 50: true, 100: true}
	var got []types.DiskChangeExtent
	calls := 0
	for start := int64(0); start < capacity; {
		areas, length := changedAreas(capacity, bs, start, 2, func(b int64) bool { return changed[b] })
		calls++
		if len(areas) > 2 || length <= 0 {
			t.Fatalf("call at %d: %d areas, length %d", start, len(areas), length)
		}
		got = append(got, areas...)
		start += length
	}
	want := []types.DiskChangeExtent{{Start: 0, Length: 20}, {Start: 30, Length: 10}, {Start: 70, Length: 30}, {Start: 500, Length: 10}, {Start: 1000, Length: 5}}
	if calls != 3 || len(got) != len(want) {
		t.Fatalf("%d calls, areas %v; want 3 calls, %v", calls, got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("areas %v, want %v", got, want)
		}
	}
	// A start inside a changed block is clipped to the start.
	areas, _ := changedAreas(capacity, bs, 75, 10, func(b int64) bool { return changed[b] })
	if len(areas) == 0 || areas[0] != (types.DiskChangeExtent{Start: 75, Length: 25}) {
		t.Fatalf("areas from 75: %v", areas)
	}
}

// sparseCopy preserves content (and holes); fileSHA256 hashes the whole capacity.
func TestSparseCopyAndChecksum(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	const size = 8 << 20
	if err := ensureSize(src, size); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(src, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	image := make([]byte, size)
	for _, off := range []int64{0, 3 << 20, size - 100} {
		b := []byte("some data at an offset, not block aligned")
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
		copy(image[off:], b)
	}
	if err := zeroRange(f, 3<<20, 10); err != nil {
		t.Fatal(err)
	}
	copy(image[3<<20:], make([]byte, 10))
	_ = f.Close()
	sum := sha256.Sum256(image)
	want := hex.EncodeToString(sum[:])

	dst := filepath.Join(dir, "dst")
	if err := sparseCopy(src, dst, size); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{src, dst} {
		got, err := fileSHA256(p, size)
		if err != nil || got != want {
			t.Fatalf("sha256(%s) = %s, %v; want %s", p, got, err, want)
		}
	}
	st, err := os.Stat(dst)
	if err != nil || st.Size() != size {
		t.Fatalf("copy size: %v %v", err, st)
	}
	if err := sparseCopy(src, dst, size); err == nil {
		t.Fatal("sparseCopy overwrote an existing file")
	}
	// A file shorter than the capacity hashes as if zero-padded.
	short := filepath.Join(dir, "short")
	if err := os.WriteFile(short, image[:1000], 0o600); err != nil {
		t.Fatal(err)
	}
	padded := append(append([]byte{}, image[:1000]...), make([]byte, 4000)...)
	ps := sha256.Sum256(padded)
	if got, err := fileSHA256(short, 5000); err != nil || got != hex.EncodeToString(ps[:]) {
		t.Fatalf("padded sha256 %s %v", got, err)
	}
}
