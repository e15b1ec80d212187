package cbtsim

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Client calls the control API.
type Client struct {
	BaseURL string
	HTTP    *http.Client
}

// NewClient returns a client whose every request has a deadline.
func NewClient(baseURL string) *Client {
	return &Client{BaseURL: strings.TrimRight(baseURL, "/"), HTTP: &http.Client{Timeout: 2 * time.Minute}}
}

// Do sends body (JSON, nil for GET) and decodes the response into out.
func (c *Client) Do(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.BaseURL+path, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	res, err := c.HTTP.Do(req)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	data, err := io.ReadAll(res.Body)
	if err != nil {
		return err
	}
	if res.StatusCode/100 != 2 {
		var e ErrorResult
		if json.Unmarshal(data, &e) == nil && e.Error != "" {
			return fmt.Errorf("%s %s: %s (HTTP %d)", method, path, e.Error, res.StatusCode)
		}
		return fmt.Errorf("%s %s: HTTP %d: %s", method, path, res.StatusCode, bytes.TrimSpace(data))
	}
	if out == nil {
		return nil
	}
	return json.Unmarshal(data, out)
}

func vmPath(vm string) string { return "/v1/vms/" + url.PathEscape(vm) }

func diskPath(vm string, key int32) string {
	return vmPath(vm) + "/disks/" + strconv.Itoa(int(key))
}

// Info returns the server's Info with its VMs as they are now.
func (c *Client) Info(ctx context.Context) (*Info, error) {
	var out Info
	return &out, c.Do(ctx, http.MethodGet, "/v1/info", nil, &out)
}

// VMs lists the VMs.
func (c *Client) VMs(ctx context.Context) ([]VMInfo, error) {
	var out []VMInfo
	return out, c.Do(ctx, http.MethodGet, "/v1/vms", nil, &out)
}

// VM describes one VM (name, moref or instance UUID).
func (c *Client) VM(ctx context.Context, vm string) (*VMInfo, error) {
	var out VMInfo
	return &out, c.Do(ctx, http.MethodGet, vmPath(vm), nil, &out)
}

// Snapshots lists a VM's snapshots with their frozen disks.
func (c *Client) Snapshots(ctx context.Context, vm string) ([]SnapshotInfo, error) {
	var out []SnapshotInfo
	return out, c.Do(ctx, http.MethodGet, vmPath(vm)+"/snapshots", nil, &out)
}

// CBT switches or resets change tracking.
func (c *Client) CBT(ctx context.Context, vm string, req CBTRequest) (*VMInfo, error) {
	var out VMInfo
	return &out, c.Do(ctx, http.MethodPost, vmPath(vm)+"/cbt", req, &out)
}

// AddDisk adds a disk of capacity bytes to a VM; the answer describes the new disk.
func (c *Client) AddDisk(ctx context.Context, vm string, capacity int64) (*DiskInfo, error) {
	var out DiskInfo
	return &out, c.Do(ctx, http.MethodPost, vmPath(vm)+"/disks", AddDiskRequest{Capacity: capacity}, &out)
}

// Write writes bytes at an offset of a live disk.
func (c *Client) Write(ctx context.Context, vm string, key int32, offset int64, data []byte) (*WriteResult, error) {
	var out WriteResult
	return &out, c.Do(ctx, http.MethodPost, diskPath(vm, key)+"/write", WriteRequest{Offset: offset, Data: data}, &out)
}

// Fill writes generated data in a pattern.
func (c *Client) Fill(ctx context.Context, vm string, key int32, req FillRequest) (*WriteResult, error) {
	var out WriteResult
	return &out, c.Do(ctx, http.MethodPost, diskPath(vm, key)+"/fill", req, &out)
}

// Zero writes zeros over a range.
func (c *Client) Zero(ctx context.Context, vm string, key int32, offset, length int64) (*WriteResult, error) {
	var out WriteResult
	return &out, c.Do(ctx, http.MethodPost, diskPath(vm, key)+"/zero", ZeroRequest{Offset: offset, Length: length}, &out)
}

// Resize grows a disk.
func (c *Client) Resize(ctx context.Context, vm string, key int32, capacity int64) (*VMInfo, error) {
	var out VMInfo
	return &out, c.Do(ctx, http.MethodPost, diskPath(vm, key)+"/resize", ResizeRequest{Capacity: capacity}, &out)
}

// Checksum is the SHA-256 of a live disk over its capacity.
func (c *Client) Checksum(ctx context.Context, vm string, key int32) (*ChecksumResult, error) {
	var out ChecksumResult
	return &out, c.Do(ctx, http.MethodGet, diskPath(vm, key)+"/sha256", nil, &out)
}

// SnapshotChecksum is the SHA-256 of a disk at a snapshot instant (moref or name).
func (c *Client) SnapshotChecksum(ctx context.Context, vm, snapshot string, key int32) (*ChecksumResult, error) {
	var out ChecksumResult
	p := vmPath(vm) + "/snapshots/" + url.PathEscape(snapshot) + "/disks/" + strconv.Itoa(int(key)) + "/sha256"
	return &out, c.Do(ctx, http.MethodGet, p, nil, &out)
}
