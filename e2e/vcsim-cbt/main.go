// Command vcsim-cbt runs govmomi's vCenter simulator with real disk contents, snapshots
// that freeze them, Changed Block Tracking and QueryChangedDiskAreas (see README.md), and
// is also the command-line client of its control API.
//
//	vcsim-cbt [serve] [flags]          start; print one JSON line; run until SIGINT/SIGTERM
//	vcsim-cbt <command> [flags]        call a running server's control API
package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"sendense.io/e2e/vcsim-cbt/internal/cbtsim"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

const usage = `usage:
  vcsim-cbt [serve] [flags]     start the simulator (vcsim-cbt serve -h for flags)
  vcsim-cbt info                server info, VMs as they are now
  vcsim-cbt vms                 list VMs
  vcsim-cbt vm        -vm VM
  vcsim-cbt snapshots -vm VM
  vcsim-cbt write     -vm VM -disk KEY -offset N (-data STR | -hex HEX | -file PATH|-)
  vcsim-cbt fill      -vm VM -disk KEY -pattern random|sequential|fragmented -seed S -count N -size SZ
                      [-offset N] [-length N] [-stride N] [-align N]
  vcsim-cbt zero      -vm VM -disk KEY -offset N -length N
  vcsim-cbt resize    -vm VM -disk KEY -capacity SZ
  vcsim-cbt add-disk  -vm VM -capacity SZ           prints the new disk (its device key: "key")
  vcsim-cbt cbt       -vm VM (-enable | -disable | -reset [-disk KEY] | -unsorted[=false] | -query-delay D)
  vcsim-cbt checksum  -vm VM -disk KEY [-snapshot MOREF|NAME]
client commands take -control URL (default $VCSIM_CBT_CONTROL) and print JSON.
VM is a name, moref or instance UUID (default $VCSIM_CBT_VM or cbt-vm-0); sizes take K/M/G/T (binary) suffixes.
`

func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	cmd := "serve"
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		cmd, args = args[0], args[1:]
	}
	var err error
	switch cmd {
	case "serve":
		err = serve(ctx, args, stdout, stderr)
	case "help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		err = client(ctx, cmd, args, stdin, stdout, stderr)
	}
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 2
		}
		fmt.Fprintf(stderr, "vcsim-cbt %s: %v\n", cmd, err)
		return 1
	}
	return 0
}

// sizeFlag is a flag.Value taking sizes with suffixes.
type sizeFlag struct{ n *int64 }

func (f sizeFlag) String() string {
	if f.n == nil {
		return "0"
	}
	return fmt.Sprint(*f.n)
}

func (f sizeFlag) Set(s string) error {
	n, err := cbtsim.ParseSize(s)
	if err != nil {
		return err
	}
	*f.n = n
	return nil
}

func serve(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg := cbtsim.DefaultConfig()
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.IntVar(&cfg.VMs, "vms", cfg.VMs, "number of VMs")
	fs.IntVar(&cfg.DisksPerVM, "disks", cfg.DisksPerVM, "virtual disks per VM (keys 2000, 2001, ...)")
	diskSizes := fs.String("disk-size", "64MiB", "disk capacity; a comma-separated list gives one per disk")
	fs.StringVar(&cfg.Listen, "listen", cfg.Listen, "SOAP (https) listen address host:port")
	fs.StringVar(&cfg.ControlListen, "control-listen", cfg.ControlListen, "control API (http) listen address host:port")
	fs.StringVar(&cfg.DatastoreDir, "datastore-dir", "", "root directory of the datastores (default: a new temporary directory); never removed")
	fs.IntVar(&cfg.PageSize, "page-size", cfg.PageSize, "max changed areas per QueryChangedDiskAreas call")
	fs.Var(sizeFlag{&cfg.BlockSize}, "block-size", "CBT block size")
	fs.StringVar(&cfg.Username, "username", cfg.Username, "user name to accept")
	fs.StringVar(&cfg.Password, "password", cfg.Password, "password to accept")
	fs.StringVar(&cfg.VMNamePrefix, "vm-prefix", cfg.VMNamePrefix, "VM names are <prefix>-0, <prefix>-1, ...")
	fs.BoolVar(&cfg.PowerOn, "power-on", cfg.PowerOn, "power the VMs on")
	fs.BoolVar(&cfg.CBT, "cbt", cfg.CBT, "enable CBT at startup")
	tlsHosts := fs.String("tls-host", "", "extra comma-separated host names/IPs for the server certificate")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	var err error
	if cfg.DiskSizes, err = cbtsim.ParseSizes(*diskSizes); err != nil {
		return err
	}
	if *tlsHosts != "" {
		cfg.TLSHosts = strings.Split(*tlsHosts, ",")
	}
	cfg.Logger = log.New(stderr, "", log.LstdFlags)

	s, err := cbtsim.Start(cfg)
	if err != nil {
		return err
	}
	defer s.Close()
	enc := json.NewEncoder(stdout) // one line
	enc.SetEscapeHTML(false)
	if err := enc.Encode(s.Info()); err != nil {
		return err
	}
	if f, ok := stdout.(*os.File); ok {
		_ = f.Sync()
	}
	<-ctx.Done()
	cfg.Logger.Printf("vcsim-cbt: shutting down (datastore directory %s is kept)", s.Info().DatastoreDir)
	return nil
}

func client(ctx context.Context, cmd string, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet(cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	control := fs.String("control", os.Getenv("VCSIM_CBT_CONTROL"), "control API URL (printed at startup as control_url)")
	defVM := os.Getenv("VCSIM_CBT_VM")
	if defVM == "" {
		defVM = "cbt-vm-0"
	}
	vm := fs.String("vm", defVM, "VM name, moref or instance UUID")
	disk := fs.Int("disk", int(cbtsim.FirstDiskKey), "virtual disk device key")
	timeout := fs.Duration("timeout", 2*time.Minute, "deadline of the call")
	var offset, length, size, stride, align, capacity int64
	var (
		data, hexData, file, pattern, snapshot string
		seed                                   uint64
		count                                  int
		queryDelay                             time.Duration
		enable, disable, reset, unsorted       bool
	)
	switch cmd {
	case "info", "vms", "vm", "snapshots":
	case "write":
		fs.Var(sizeFlag{&offset}, "offset", "byte offset")
		fs.StringVar(&data, "data", "", "bytes to write, as a literal string")
		fs.StringVar(&hexData, "hex", "", "bytes to write, hex-encoded")
		fs.StringVar(&file, "file", "", "file whose content to write (- for stdin)")
	case "fill":
		fs.StringVar(&pattern, "pattern", "random", "random, sequential or fragmented")
		fs.Uint64Var(&seed, "seed", 1, "seed of offsets (random) and content")
		fs.IntVar(&count, "count", 1, "number of writes")
		fs.Var(sizeFlag{&size}, "size", "bytes per write")
		fs.Var(sizeFlag{&offset}, "offset", "first offset")
		fs.Var(sizeFlag{&length}, "length", "random: range length (default: to the end of the disk)")
		fs.Var(sizeFlag{&stride}, "stride", "fragmented: distance between writes (default: 2 blocks)")
		fs.Var(sizeFlag{&align}, "align", "random: offset alignment (default 512)")
	case "zero":
		fs.Var(sizeFlag{&offset}, "offset", "byte offset")
		fs.Var(sizeFlag{&length}, "length", "bytes to zero")
	case "resize":
		fs.Var(sizeFlag{&capacity}, "capacity", "new capacity (grow only)")
	case "add-disk":
		capacity = 64 << 20
		fs.Var(sizeFlag{&capacity}, "capacity", "capacity of the new disk")
	case "cbt":
		fs.BoolVar(&enable, "enable", false, "enable change tracking")
		fs.BoolVar(&disable, "disable", false, "disable change tracking")
		fs.BoolVar(&reset, "reset", false, "reset change tracking (all disks, or -disk)")
		fs.BoolVar(&unsorted, "unsorted", false, "QueryChangedDiskAreas lists each page's areas out of order (-unsorted=false: in order again)")
		fs.DurationVar(&queryDelay, "query-delay", 0, "each QueryChangedDiskAreas call waits this long before it is answered (0: at once)")
	case "checksum":
		fs.StringVar(&snapshot, "snapshot", "", "snapshot moref or name (default: the live disk)")
	default:
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("unknown command %q", cmd)
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if *control == "" {
		return errors.New("no control URL: pass -control or set VCSIM_CBT_CONTROL")
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	key := int32(*disk)
	c := cbtsim.NewClient(*control)
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()

	var out any
	var err error
	switch cmd {
	case "info":
		out, err = c.Info(ctx)
	case "vms":
		out, err = c.VMs(ctx)
	case "vm":
		out, err = c.VM(ctx, *vm)
	case "snapshots":
		out, err = c.Snapshots(ctx, *vm)
	case "write":
		var b []byte
		switch {
		case file == "-":
			b, err = io.ReadAll(stdin)
		case file != "":
			b, err = os.ReadFile(file)
		case hexData != "":
			b, err = hex.DecodeString(hexData)
		default:
			b = []byte(data)
		}
		if err != nil {
			return err
		}
		if len(b) == 0 {
			return errors.New("nothing to write: give -data, -hex or -file")
		}
		out, err = c.Write(ctx, *vm, key, offset, b)
	case "fill":
		out, err = c.Fill(ctx, *vm, key, cbtsim.FillRequest{
			Pattern: pattern, Seed: seed, Count: count, Size: size,
			Offset: offset, Length: length, Stride: stride, Align: align,
		})
	case "zero":
		out, err = c.Zero(ctx, *vm, key, offset, length)
	case "resize":
		out, err = c.Resize(ctx, *vm, key, capacity)
	case "add-disk":
		out, err = c.AddDisk(ctx, *vm, capacity)
	case "cbt":
		req := cbtsim.CBTRequest{Reset: reset}
		switch {
		case enable && disable:
			return errors.New("-enable and -disable are exclusive")
		case enable:
			req.Enabled = &enable
		case disable:
			off := false
			req.Enabled = &off
		}
		if set["disk"] {
			req.Disk = &key
		}
		if set["unsorted"] {
			req.Unsorted = &unsorted
		}
		if set["query-delay"] {
			ms := queryDelay.Milliseconds()
			req.QueryDelayMs = &ms
		}
		out, err = c.CBT(ctx, *vm, req)
	case "checksum":
		if snapshot != "" {
			out, err = c.SnapshotChecksum(ctx, *vm, snapshot, key)
		} else {
			out, err = c.Checksum(ctx, *vm, key)
		}
	}
	if err != nil {
		return err
	}
	enc := json.NewEncoder(stdout)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	return enc.Encode(out)
}
