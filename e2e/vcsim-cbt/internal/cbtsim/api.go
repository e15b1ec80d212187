package cbtsim

// JSON types of the startup line and of the control API (shared by server and client).

// Info is printed as one JSON line on startup and served at GET /v1/info.
type Info struct {
	URL               string            `json:"url"`      // SOAP endpoint, https://host:port/sdk
	Host              string            `json:"host"`     // host:port of the SOAP endpoint
	Username          string            `json:"username"` // the only accepted login
	Password          string            `json:"password"`
	Thumbprint        string            `json:"thumbprint"`      // SHA-256 of the server certificate, "AA:BB:..."
	ThumbprintSHA1    string            `json:"thumbprint_sha1"` // SHA-1, the form VDDK/nbdkit-vddk take
	CAFile            string            `json:"ca_file"`         // PEM of the CA that signed the server certificate
	CertFile          string            `json:"cert_file"`       // PEM of the server certificate
	Datacenter        string            `json:"datacenter"`
	DatastoreDir      string            `json:"datastore_dir"` // root directory; one subdirectory per datastore
	Datastores        map[string]string `json:"datastores"`    // datastore name -> its directory
	ControlURL        string            `json:"control_url"`
	BlockSize         int64             `json:"block_size"`          // CBT granularity in bytes
	PageSize          int               `json:"page_size"`           // max areas per QueryChangedDiskAreas call
	FlatFileMapping   string            `json:"flat_file_mapping"`   // how a backing fileName maps to its data file
	SnapshotFileNames string            `json:"snapshot_file_names"` // how frozen snapshot disks are named
	PID               int               `json:"pid"`
	VMs               []VMInfo          `json:"vms"`
}

// VMInfo describes one VM, its live disks and its snapshots.
type VMInfo struct {
	Name          string         `json:"name"`
	Moref         string         `json:"moref"`
	InstanceUUID  string         `json:"instance_uuid"`
	UUID          string         `json:"uuid"`
	PowerState    string         `json:"power_state"`
	CBT           bool           `json:"cbt"`
	UnsortedPages bool           `json:"unsorted_pages"` // QueryChangedDiskAreas pages out of order (CBTRequest.Unsorted)
	QueryDelayMs  int64          `json:"query_delay_ms"` // each QueryChangedDiskAreas call waits this long first (CBTRequest.QueryDelayMs)
	QueriesHeld   int            `json:"queries_held"`   // QueryChangedDiskAreas calls waiting out the delay now
	Disks         []DiskInfo     `json:"disks"`
	Snapshots     []SnapshotInfo `json:"snapshots"`
}

// DiskInfo describes a live or frozen disk.
type DiskInfo struct {
	Key      int32  `json:"key"`
	FileName string `json:"file_name"` // as in the device backing: "[LocalDS_0] vm/vm.vmdk"
	FlatFile string `json:"flat_file"` // absolute path of the raw data
	Capacity int64  `json:"capacity"`
	ChangeID string `json:"change_id,omitempty"`
	Error    string `json:"error,omitempty"`
}

// SnapshotInfo describes a snapshot and its frozen disks.
type SnapshotInfo struct {
	Moref string     `json:"moref"`
	Name  string     `json:"name"`
	Disks []DiskInfo `json:"disks"`
}

// Extent is a byte range.
type Extent struct {
	Offset int64 `json:"offset"`
	Length int64 `json:"length"`
}

// WriteRequest writes Data (base64 in JSON) at Offset.
type WriteRequest struct {
	Offset int64  `json:"offset"`
	Data   []byte `json:"data"`
}

// FillRequest writes generated data. Content is a deterministic function of Seed.
//   - "sequential": Count writes of Size bytes back to back from Offset.
//   - "fragmented": Count writes of Size bytes at Offset + i*Stride (Stride defaults to
//     twice the block size, so writes never share or touch a block when Size <= block size).
//   - "random": Count writes of Size bytes at random Align-ed offsets (Align defaults to
//     512) in [Offset, Offset+Length) (Length defaults to the rest of the disk); they may
//     overlap.
type FillRequest struct {
	Pattern string `json:"pattern"`
	Seed    uint64 `json:"seed"`
	Count   int    `json:"count"`
	Size    int64  `json:"size"`
	Offset  int64  `json:"offset,omitempty"`
	Length  int64  `json:"length,omitempty"`
	Stride  int64  `json:"stride,omitempty"`
	Align   int64  `json:"align,omitempty"`
}

// ZeroRequest makes [Offset, Offset+Length) zeros: a guest write of zeros, which CBT
// reports as a change.
type ZeroRequest struct {
	Offset int64 `json:"offset"`
	Length int64 `json:"length"`
}

// ResizeRequest grows a disk to Capacity bytes (a multiple of 1 KiB); this resets its CBT.
type ResizeRequest struct {
	Capacity int64 `json:"capacity"`
}

// CBTRequest switches change tracking (Enabled) and/or resets it (Reset: every changeId
// issued so far becomes invalid) for all disks, or only Disk when set.
//
// Unsorted, when set, switches how QueryChangedDiskAreas orders each page's areas for every
// disk of the VM (Disk does not narrow it): true lists them in a shuffled order (the same
// for the same page, never sorted when the page has two or more areas), false in order of
// start, as vCenter does. The areas themselves and the paging do not change: a client that
// relies on the order loses or misjoins areas.
//
// QueryDelayMs, when set, makes every later QueryChangedDiskAreas call on the VM wait that
// many milliseconds before it is answered (0: at once again), as a vCenter busy with a large
// disk does; lowering it releases the calls already waiting, and VMInfo.QueriesHeld counts
// them. A test uses it to act (freeze the simulator) while a client is inside the query.
type CBTRequest struct {
	Enabled      *bool  `json:"enabled,omitempty"`
	Reset        bool   `json:"reset,omitempty"`
	Disk         *int32 `json:"disk,omitempty"`
	Unsorted     *bool  `json:"unsorted,omitempty"`
	QueryDelayMs *int64 `json:"query_delay_ms,omitempty"`
}

// AddDiskRequest adds a thin flat disk of Capacity bytes (at least 1 MiB, a multiple of
// 1 KiB) to a VM, as ReconfigVM_Task with a device "add" and file operation "create" would:
// the next free device key and unit of the VM's SCSI controller, a new file in the VM's
// directory, CBT on it when the VM has CBT on (a new uuid). The answer is its DiskInfo.
type AddDiskRequest struct {
	Capacity int64 `json:"capacity"`
}

// WriteResult reports a guest write operation: the extents written, in order.
type WriteResult struct {
	Extents  []Extent `json:"extents"`
	Bytes    int64    `json:"bytes"`
	ChangeID string   `json:"change_id,omitempty"` // the live disk's changeId afterwards
}

// ChecksumResult is the SHA-256 of a disk over its whole capacity.
type ChecksumResult struct {
	SHA256   string `json:"sha256"`
	Capacity int64  `json:"capacity"`
	FlatFile string `json:"flat_file"`
	ChangeID string `json:"change_id,omitempty"`
}

// ErrorResult is the body of every non-2xx control API response.
type ErrorResult struct {
	Error string `json:"error"`
}
