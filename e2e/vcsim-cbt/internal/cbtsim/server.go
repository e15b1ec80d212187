// Package cbtsim runs govmomi's vCenter simulator extended with what backups need: real
// disk contents as flat files in the datastore directory, snapshots that freeze them,
// Changed Block Tracking with vCenter-style change IDs, QueryChangedDiskAreas with
// paging, and a control API through which tests act as the guest.
package cbtsim

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// Names of the inventory the server builds on govmomi's VPX model.
const (
	DatacenterName = "DC0"
	ClusterName    = "DC0_C0"
	DatastoreName  = "LocalDS_0"
	// ControllerKey is the paravirtual SCSI controller of every VM; disks are 2000, 2001, ...
	ControllerKey int32 = 1000
	FirstDiskKey  int32 = 2000
	// MaxDisksPerVM: one SCSI controller has 16 units, one (7) is the controller's own.
	MaxDisksPerVM = 15
)

// Config of a server. Zero fields take the defaults of DefaultConfig.
type Config struct {
	VMs           int     // number of VMs
	DisksPerVM    int     // virtual disks per VM (keys 2000, 2001, ...)
	DiskSizes     []int64 // capacity in bytes per disk index; one value applies to all disks
	Listen        string  // SOAP (https) listen address, host:port (port 0: any free port)
	ControlListen string  // control API (http) listen address
	DatastoreDir  string  // root directory of the datastores; "" = a new temporary directory
	PageSize      int     // max areas one QueryChangedDiskAreas call returns
	BlockSize     int64   // CBT granularity in bytes
	Username      string
	Password      string
	VMNamePrefix  string   // VMs are named <prefix>-0, <prefix>-1, ...
	PowerOn       bool     // power the VMs on after creation
	CBT           bool     // enable CBT on the VMs at startup (default: off until a client enables it)
	TLSHosts      []string // extra host names / IPs for the server certificate
	Logger        *log.Logger
}

// DefaultConfig is one VM with two 64 MiB disks, CBT off, 64 KiB blocks, 2000 areas per page.
func DefaultConfig() Config {
	return Config{
		VMs:           1,
		DisksPerVM:    2,
		DiskSizes:     []int64{64 << 20},
		Listen:        "127.0.0.1:0",
		ControlListen: "127.0.0.1:0",
		PageSize:      2000,
		BlockSize:     64 << 10,
		Username:      "administrator@vsphere.local",
		Password:      "vcsim-cbt",
		VMNamePrefix:  "cbt-vm",
		PowerOn:       true,
	}
}

// Server is a running simulator.
type Server struct {
	cfg     Config
	model   *simulator.Model
	soap    *simulator.Server
	control *http.Server
	ctlLn   net.Listener
	tracker *tracker
	guard   *snapshotGuard
	panics  *panicNet
	info    Info
	adding  sync.Mutex // one AddDisk at a time: each picks a free key, unit and file
}

// Start builds the inventory, starts the SOAP (TLS) and control endpoints and returns
// once both accept connections.
func Start(cfg Config) (_ *Server, err error) {
	def := DefaultConfig()
	if cfg.VMs == 0 {
		cfg.VMs = def.VMs
	}
	if cfg.DisksPerVM == 0 {
		cfg.DisksPerVM = def.DisksPerVM
	}
	if len(cfg.DiskSizes) == 0 {
		cfg.DiskSizes = def.DiskSizes
	}
	if cfg.Listen == "" {
		cfg.Listen = def.Listen
	}
	if cfg.ControlListen == "" {
		cfg.ControlListen = def.ControlListen
	}
	if cfg.PageSize == 0 {
		cfg.PageSize = def.PageSize
	}
	if cfg.BlockSize == 0 {
		cfg.BlockSize = def.BlockSize
	}
	if cfg.Username == "" {
		cfg.Username = def.Username
	}
	if cfg.Password == "" {
		cfg.Password = def.Password
	}
	if cfg.VMNamePrefix == "" {
		cfg.VMNamePrefix = def.VMNamePrefix
	}
	if err := validate(&cfg); err != nil {
		return nil, err
	}

	root := cfg.DatastoreDir
	if root == "" {
		if root, err = os.MkdirTemp("", "vcsim-cbt-"); err != nil {
			return nil, err
		}
	}
	if root, err = filepath.Abs(root); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, err
	}
	dsDir := filepath.Join(root, DatastoreName)
	if entries, err := os.ReadDir(dsDir); err == nil && len(entries) > 0 {
		return nil, fmt.Errorf("datastore directory %s is not empty (use a new -datastore-dir)", dsDir)
	}
	if err := os.MkdirAll(dsDir, 0o755); err != nil {
		return nil, err
	}

	host, _, err := net.SplitHostPort(cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("listen address %q: %w", cfg.Listen, err)
	}
	sans := []string{"localhost", "127.0.0.1", "::1"}
	if host != "" && host != "0.0.0.0" && host != "::" {
		sans = append(sans, host)
	}
	sans = append(sans, cfg.TLSHosts...)
	caFile := filepath.Join(root, "vcsim-cbt-ca.pem")
	certFile := filepath.Join(root, "vcsim-cbt-cert.pem")
	cert, err := newCertificates(sans, caFile, certFile)
	if err != nil {
		return nil, fmt.Errorf("tls certificate: %w", err)
	}

	model := simulator.VPX()
	model.Machine = 0   // our own VMs, below
	model.Datastore = 0 // our own datastore, in root
	model.Autostart = false
	if err := model.Create(); err != nil {
		return nil, fmt.Errorf("simulator model: %w", err)
	}
	s := &Server{cfg: cfg, model: model}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	reg := model.Map()
	s.panics = newPanicNet(cfg.Logger)
	s.tracker = newTracker(reg, cfg.BlockSize, cfg.PageSize, cfg.Logger)
	s.tracker.panics = s.panics
	s.tracker.install()
	s.guard = newSnapshotGuard(reg, s.panics)
	s.guard.install()

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	vms, err := s.buildInventory(ctx, dsDir)
	if err != nil {
		return nil, err
	}

	model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	model.Service.Listen = &url.URL{Host: cfg.Listen, User: url.UserPassword(cfg.Username, cfg.Password)}
	if s.soap, err = newSOAPServer(model.Service, s.panics); err != nil {
		return nil, err
	}
	soapURL := *s.soap.URL
	soapURL.User = nil

	if s.ctlLn, err = net.Listen("tcp", cfg.ControlListen); err != nil {
		return nil, fmt.Errorf("control listener: %w", err)
	}
	s.control = &http.Server{Handler: s.panics.handler("control API", s.controlHandler(), jsonInternalError), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := s.control.Serve(s.ctlLn); err != nil && !errors.Is(err, http.ErrServerClosed) && cfg.Logger != nil {
			cfg.Logger.Printf("vcsim-cbt: control server: %v", err)
		}
	}()

	s.info = Info{
		URL:               soapURL.String(),
		Host:              soapURL.Host,
		Username:          cfg.Username,
		Password:          cfg.Password,
		Thumbprint:        soap.ThumbprintSHA256(cert.Leaf),
		ThumbprintSHA1:    soap.ThumbprintSHA1(cert.Leaf),
		CAFile:            caFile,
		CertFile:          certFile,
		Datacenter:        DatacenterName,
		DatastoreDir:      root,
		Datastores:        map[string]string{DatastoreName: dsDir},
		ControlURL:        "http://" + s.ctlLn.Addr().String(),
		BlockSize:         cfg.BlockSize,
		PageSize:          cfg.PageSize,
		FlatFileMapping:   `backing fileName "[<datastore>] <dir>/<name>.vmdk" is a text descriptor; the raw data is <datastore dir>/<dir>/<name>-flat.vmdk`,
		SnapshotFileNames: `a snapshot freezes "[<datastore>] <dir>/<name>.vmdk" as "[<datastore>] <dir>/<name>-<snapshot moref>.vmdk" (data in <name>-<snapshot moref>-flat.vmdk)`,
		PID:               os.Getpid(),
		VMs:               vms,
	}
	return s, nil
}

func validate(cfg *Config) error {
	switch {
	case cfg.VMs < 1:
		return errors.New("need at least one VM")
	case cfg.DisksPerVM < 1 || cfg.DisksPerVM > MaxDisksPerVM:
		return fmt.Errorf("disks per VM must be in 1..%d", MaxDisksPerVM)
	case len(cfg.DiskSizes) != 1 && len(cfg.DiskSizes) != cfg.DisksPerVM:
		return fmt.Errorf("give one disk size, or one per disk (%d)", cfg.DisksPerVM)
	case cfg.PageSize < 1:
		return errors.New("page size must be positive")
	case cfg.BlockSize < 512 || cfg.BlockSize%512 != 0:
		return errors.New("block size must be a positive multiple of 512")
	}
	for _, size := range cfg.DiskSizes {
		if size < 1<<20 || size%1024 != 0 {
			return fmt.Errorf("disk size %d: must be at least 1 MiB and a multiple of 1 KiB", size)
		}
	}
	return nil
}

// newSOAPServer starts the simulator's https server; NewServer panics when it cannot
// listen, which becomes an error here.
//
// SOAP calls (POST to the SDK paths) go through the panic net. The simulator registers its
// handler for those paths on its ServeMux when the server starts, without a method; the
// net's "POST <path>" patterns, registered first, are more specific and win (net/http's
// ServeMux precedence), and call the same handler.
func newSOAPServer(svc *simulator.Service, panics *panicNet) (srv *simulator.Server, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("soap listener: %v", r)
		}
	}()
	if svc.ServeMux == nil {
		svc.ServeMux = http.NewServeMux()
	}
	sdk := panics.handler("SOAP call", http.HandlerFunc(svc.ServeSDK), soapSystemError)
	path := svc.Context.Map.Path // "/sdk"; NewServer adds the alias "/sdk/vimService"
	svc.ServeMux.Handle("POST "+path, sdk)
	svc.ServeMux.Handle("POST "+path+"/vimService", sdk)
	return svc.NewServer(), nil
}

// buildInventory mounts the datastore on every host and creates the VMs, through the
// simulator's in-process SOAP client.
func (s *Server) buildInventory(ctx context.Context, dsDir string) ([]VMInfo, error) {
	c, err := vim25.NewClient(ctx, s.model.Service)
	if err != nil {
		return nil, err
	}
	for _, e := range s.model.Map().All("HostSystem") {
		h := object.NewHostSystem(c, e.Reference())
		dss, err := h.ConfigManager().DatastoreSystem(ctx)
		if err != nil {
			return nil, err
		}
		if _, err := dss.CreateLocalDatastore(ctx, DatastoreName, dsDir); err != nil {
			return nil, fmt.Errorf("mount %s on %s: %w", DatastoreName, e.Reference().Value, err)
		}
	}

	finder := find.NewFinder(c, false)
	dc, err := finder.Datacenter(ctx, DatacenterName)
	if err != nil {
		return nil, err
	}
	finder.SetDatacenter(dc)
	folders, err := dc.Folders(ctx)
	if err != nil {
		return nil, err
	}
	cluster, err := finder.ClusterComputeResource(ctx, ClusterName)
	if err != nil {
		return nil, err
	}
	pool, err := cluster.ResourcePool(ctx)
	if err != nil {
		return nil, err
	}
	hosts, err := cluster.Hosts(ctx)
	if err != nil || len(hosts) == 0 {
		return nil, fmt.Errorf("hosts of %s: %v", ClusterName, err)
	}
	sort.Slice(hosts, func(i, j int) bool { return hosts[i].Reference().Value < hosts[j].Reference().Value })

	var out []VMInfo
	for i := range s.cfg.VMs {
		spec := s.vmSpec(i)
		task, err := folders.VmFolder.CreateVM(ctx, spec, pool, hosts[0])
		if err != nil {
			return nil, err
		}
		res, err := task.WaitForResult(ctx)
		if err != nil {
			return nil, fmt.Errorf("create %s: %w", spec.Name, err)
		}
		vm := object.NewVirtualMachine(c, res.Result.(types.ManagedObjectReference))
		if s.cfg.CBT {
			task, err := vm.Reconfigure(ctx, types.VirtualMachineConfigSpec{ChangeTrackingEnabled: types.NewBool(true)})
			if err == nil {
				err = task.Wait(ctx)
			}
			if err != nil {
				return nil, fmt.Errorf("enable CBT on %s: %w", spec.Name, err)
			}
		}
		if s.cfg.PowerOn {
			task, err := vm.PowerOn(ctx)
			if err == nil {
				err = task.Wait(ctx)
			}
			if err != nil {
				return nil, fmt.Errorf("power on %s: %w", spec.Name, err)
			}
		}
		info, err := s.tracker.VM(vm.Reference().Value) // the disks as CreateVM_Task left them (flat files made)
		if err != nil {
			return nil, err
		}
		out = append(out, *info)
	}
	return out, nil
}

// vmSpec is VM i: predictable name, UUIDs, one paravirtual SCSI controller (key 1000)
// and thin flat disks 2000, 2001, ... named like vSphere names them.
func (s *Server) vmSpec(i int) types.VirtualMachineConfigSpec {
	name := fmt.Sprintf("%s-%d", s.cfg.VMNamePrefix, i)
	spec := types.VirtualMachineConfigSpec{
		Name:         name,
		GuestId:      string(types.VirtualMachineGuestOsIdentifierOtherGuest64),
		NumCPUs:      1,
		MemoryMB:     256,
		Uuid:         fmt.Sprintf("420c0000-0000-4000-8000-%012x", i+1),
		InstanceUuid: fmt.Sprintf("500c0000-0000-4000-8000-%012x", i+1),
		Files:        &types.VirtualMachineFileInfo{VmPathName: fmt.Sprintf("[%s]", DatastoreName)},
	}
	ctrl := &types.ParaVirtualSCSIController{VirtualSCSIController: types.VirtualSCSIController{
		VirtualController: types.VirtualController{VirtualDevice: types.VirtualDevice{
			Key:        ControllerKey,
			DeviceInfo: &types.Description{Label: "SCSI controller 0", Summary: "VMware paravirtual SCSI"},
		}},
		SharedBus: types.VirtualSCSISharingNoSharing,
	}}
	spec.DeviceChange = append(spec.DeviceChange, &types.VirtualDeviceConfigSpec{
		Operation: types.VirtualDeviceConfigSpecOperationAdd,
		Device:    ctrl,
	})
	unit := int32(0)
	for j := range s.cfg.DisksPerVM {
		if unit == 7 {
			unit++ // the controller's own unit
		}
		size := s.cfg.DiskSizes[0]
		if len(s.cfg.DiskSizes) > 1 {
			size = s.cfg.DiskSizes[j]
		}
		file := fmt.Sprintf("[%s] %s/%s.vmdk", DatastoreName, name, name)
		if j > 0 {
			file = diskFileName(name, j)
		}
		spec.DeviceChange = append(spec.DeviceChange, diskDevice(FirstDiskKey+int32(j), unit, j+1, file, size))
		unit++
	}
	return spec
}

// Panics is the number of panics the server survived (each logged with PanicMarker). Any
// is a bug: tests assert none.
func (s *Server) Panics() int64 { return s.panics.count.Load() }

// Info is what the server printed at startup (VMs as they were then).
func (s *Server) Info() Info { return s.info }

func (s *Server) currentInfo() (Info, error) {
	info := s.info
	vms, err := s.tracker.VMs()
	if err != nil {
		return Info{}, err
	}
	info.VMs = vms
	return info, nil
}

// closeTimeout bounds how long Close waits for SOAP calls in progress.
const closeTimeout = 10 * time.Second

// Close stops both endpoints. It removes nothing from the datastore directory.
func (s *Server) Close() {
	if s.control != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = s.control.Shutdown(ctx)
		cancel()
	} else if s.ctlLn != nil {
		_ = s.ctlLn.Close()
	}
	if s.soap != nil {
		// Close waits for the calls in progress, and a call can wait forever for a lock
		// that a recovered panic left held (see panicNet): wait a while, not forever.
		closed := make(chan struct{})
		go func() {
			s.soap.Close()
			close(closed)
		}()
		select {
		case <-closed:
		case <-time.After(closeTimeout):
			s.panics.logger.Printf("vcsim-cbt: SOAP calls still running %s after close (waiting for a lock a panic left held?); leaving them", closeTimeout)
			s.soap.CloseClientConnections()
		}
	}
	if s.model != nil {
		s.model.Remove() // the simulator's own (empty) temporary directory, not ours
	}
}
