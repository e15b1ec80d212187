package cbtsim

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"

	"github.com/vmware/govmomi/vmdk"
)

// Linux lseek(2) whence values for sparse files (not exported by package syscall).
const (
	seekData = 3
	seekHole = 4
)

// Linux fallocate(2) mode bits.
const (
	fallocKeepSize  = 0x01
	fallocPunchHole = 0x02
)

// copyBufSize bounds the memory used to copy and hash disks.
const copyBufSize = 1 << 20

var zeroBuf = make([]byte, copyBufSize)

// dataSegments returns the allocated (non-hole) segments of f in [0, size), using
// SEEK_DATA/SEEK_HOLE. When the file system does not support them, the whole range is
// returned as one segment (correct, just not sparse-aware).
func dataSegments(f *os.File, size int64) ([][2]int64, error) {
	var segs [][2]int64
	off := int64(0)
	for off < size {
		start, err := f.Seek(off, seekData)
		if err != nil {
			if errors.Is(err, syscall.ENXIO) {
				break // no data after off
			}
			if errors.Is(err, syscall.EINVAL) && off == 0 {
				return [][2]int64{{0, size}}, nil // SEEK_DATA unsupported
			}
			return nil, fmt.Errorf("seek data in %s at %d: %w", f.Name(), off, err)
		}
		if start >= size {
			break
		}
		end, err := f.Seek(start, seekHole)
		if err != nil {
			return nil, fmt.Errorf("seek hole in %s at %d: %w", f.Name(), start, err)
		}
		end = min(end, size)
		segs = append(segs, [2]int64{start, end})
		off = end
	}
	return segs, nil
}

// sparseCopy copies the first size bytes of src into a new file dst (which must not
// exist), preserving holes: only the data segments of src are copied and dst is
// extended to size with ftruncate, so unwritten areas stay holes. Runs of zeros inside
// data segments are skipped too.
func sparseCopy(src, dst string, size int64) (err error) {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			_ = os.Remove(dst)
		}
	}()
	segs, err := dataSegments(in, size)
	if err != nil {
		return err
	}
	buf := make([]byte, copyBufSize)
	for _, s := range segs {
		for off := s[0]; off < s[1]; {
			n := min(int64(len(buf)), s[1]-off)
			m, rerr := in.ReadAt(buf[:n], off)
			if rerr != nil && !errors.Is(rerr, io.EOF) {
				return rerr
			}
			if m == 0 {
				break // src shorter than its reported size: the rest reads as zeros
			}
			if !allZero(buf[:m]) {
				if _, werr := out.WriteAt(buf[:m], off); werr != nil {
					return werr
				}
			}
			off += int64(m)
		}
	}
	if err := out.Truncate(size); err != nil {
		return err
	}
	return out.Sync()
}

// holdsData reports whether [lo, hi) of f has a non-zero byte, reading it through buf.
func holdsData(f *os.File, lo, hi int64, buf []byte) (bool, error) {
	for off := lo; off < hi; {
		n := min(int64(len(buf)), hi-off)
		m, err := f.ReadAt(buf[:n], off)
		if !allZero(buf[:m]) {
			return true, nil
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				return false, nil // the rest reads as zeros
			}
			return false, err
		}
		off += int64(m)
	}
	return false, nil
}

func allZero(b []byte) bool {
	for len(b) >= 8 {
		if b[0]|b[1]|b[2]|b[3]|b[4]|b[5]|b[6]|b[7] != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// fileSHA256 hashes exactly size bytes of the file: its content, with holes and
// anything past the end of a shorter file read as zeros.
func fileSHA256(path string, size int64) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "", err
	}
	segs, err := dataSegments(f, min(size, st.Size()))
	if err != nil {
		return "", err
	}
	h := sha256.New()
	buf := make([]byte, copyBufSize)
	pos := int64(0)
	writeZeros := func(n int64) {
		for n > 0 {
			c := min(n, int64(len(zeroBuf)))
			h.Write(zeroBuf[:c])
			n -= c
		}
	}
	for _, s := range segs {
		writeZeros(s[0] - pos)
		for off := s[0]; off < s[1]; {
			n := min(int64(len(buf)), s[1]-off)
			m, rerr := f.ReadAt(buf[:n], off)
			if rerr != nil && !errors.Is(rerr, io.EOF) {
				return "", rerr
			}
			h.Write(buf[:m])
			off += int64(m)
			if m == 0 {
				writeZeros(s[1] - off)
				off = s[1]
			}
		}
		pos = s[1]
	}
	writeZeros(size - pos)
	return hex.EncodeToString(h.Sum(nil)), nil
}

// zeroRange makes [off, off+n) of f read as zeros, the way a guest writing zeros would:
// by punching a hole (keeping the size) or, where that is unsupported, writing zeros.
func zeroRange(f *os.File, off, n int64) error {
	if n <= 0 {
		return nil
	}
	if err := syscall.Fallocate(int(f.Fd()), fallocPunchHole|fallocKeepSize, off, n); err == nil {
		return nil
	}
	for n > 0 {
		c := min(n, int64(len(zeroBuf)))
		if _, err := f.WriteAt(zeroBuf[:c], off); err != nil {
			return err
		}
		off += c
		n -= c
	}
	return nil
}

// ensureSize makes path a file of exactly size bytes (creating it if missing); growing
// leaves a hole, so a new disk allocates nothing.
func ensureSize(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if st.Size() != size {
		if err := f.Truncate(size); err != nil {
			return err
		}
	}
	return nil
}

// writeDescriptor writes a VMware text descriptor at path for a monolithic flat disk
// whose extent is the file flatName (a sibling of path) of capacity bytes.
func writeDescriptor(path, flatName string, capacity int64, uuid string) error {
	desc := vmdk.NewDescriptor(vmdk.Extent{
		Type:       "VMFS",
		Permission: "RW",
		Size:       capacity / vmdk.SectorSize,
		Info:       flatName,
	})
	desc.DDB["adapterType"] = "lsilogic"
	desc.DDB["virtualHWVersion"] = "21"
	desc.DDB["thinProvisioned"] = "1"
	if uuid != "" {
		desc.DDB["uuid"] = uuid
	}
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if err := desc.Write(f); err != nil {
		_ = f.Close()
		_ = os.Remove(tmp)
		return err
	}
	if err := f.Close(); err != nil {
		_ = os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, filepath.Clean(path))
}
