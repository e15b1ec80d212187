package cbtsim

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
)

// The control API: a small JSON-over-HTTP endpoint for tests (plain http, bind it to
// loopback). Every response is JSON; errors are {"error": "..."} with a 4xx/5xx status.
//
//	GET  /v1/info                                        startup Info (with current VMs)
//	GET  /v1/vms                                         []VMInfo
//	GET  /v1/vms/{vm}                                    VMInfo ({vm}: name, moref or instance UUID)
//	POST /v1/vms/{vm}/cbt                                CBTRequest -> VMInfo
//	POST /v1/vms/{vm}/disks                              AddDiskRequest -> DiskInfo of the new disk
//	POST /v1/vms/{vm}/disks/{key}/write                  WriteRequest -> WriteResult
//	POST /v1/vms/{vm}/disks/{key}/fill                   FillRequest -> WriteResult
//	POST /v1/vms/{vm}/disks/{key}/zero                   ZeroRequest -> WriteResult
//	POST /v1/vms/{vm}/disks/{key}/resize                 ResizeRequest -> VMInfo
//	GET  /v1/vms/{vm}/disks/{key}/sha256                 ChecksumResult of the live disk
//	GET  /v1/vms/{vm}/snapshots                          []SnapshotInfo
//	GET  /v1/vms/{vm}/snapshots/{snap}/disks/{key}/sha256 ChecksumResult at the snapshot instant

// maxRequestBody bounds a control request (a write of up to 64 MiB, base64-encoded).
const maxRequestBody = 96 << 20

func (s *Server) controlHandler() http.Handler {
	t := s.tracker
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/info", func(w http.ResponseWriter, r *http.Request) {
		info, err := s.currentInfo()
		reply(w, info, err)
	})
	mux.HandleFunc("GET /v1/vms", func(w http.ResponseWriter, r *http.Request) {
		vms, err := t.VMs()
		reply(w, vms, err)
	})
	mux.HandleFunc("GET /v1/vms/{vm}", func(w http.ResponseWriter, r *http.Request) {
		info, err := t.VM(r.PathValue("vm"))
		reply(w, info, err)
	})
	mux.HandleFunc("POST /v1/vms/{vm}/cbt", func(w http.ResponseWriter, r *http.Request) {
		var req CBTRequest
		if !decode(w, r, &req) {
			return
		}
		info, err := t.SetCBT(r.PathValue("vm"), req)
		reply(w, info, err)
	})
	mux.HandleFunc("POST /v1/vms/{vm}/disks", func(w http.ResponseWriter, r *http.Request) {
		var req AddDiskRequest
		if !decode(w, r, &req) {
			return
		}
		info, err := s.AddDisk(r.Context(), r.PathValue("vm"), req)
		reply(w, info, err)
	})
	mux.HandleFunc("POST /v1/vms/{vm}/disks/{key}/write", func(w http.ResponseWriter, r *http.Request) {
		var req WriteRequest
		key, ok := diskKey(w, r)
		if !ok || !decode(w, r, &req) {
			return
		}
		res, err := t.Write(r.PathValue("vm"), key, req)
		reply(w, res, err)
	})
	mux.HandleFunc("POST /v1/vms/{vm}/disks/{key}/fill", func(w http.ResponseWriter, r *http.Request) {
		var req FillRequest
		key, ok := diskKey(w, r)
		if !ok || !decode(w, r, &req) {
			return
		}
		res, err := t.Fill(r.PathValue("vm"), key, req)
		reply(w, res, err)
	})
	mux.HandleFunc("POST /v1/vms/{vm}/disks/{key}/zero", func(w http.ResponseWriter, r *http.Request) {
		var req ZeroRequest
		key, ok := diskKey(w, r)
		if !ok || !decode(w, r, &req) {
			return
		}
		res, err := t.Zero(r.PathValue("vm"), key, req)
		reply(w, res, err)
	})
	mux.HandleFunc("POST /v1/vms/{vm}/disks/{key}/resize", func(w http.ResponseWriter, r *http.Request) {
		var req ResizeRequest
		key, ok := diskKey(w, r)
		if !ok || !decode(w, r, &req) {
			return
		}
		info, err := t.Resize(r.PathValue("vm"), key, req)
		reply(w, info, err)
	})
	mux.HandleFunc("GET /v1/vms/{vm}/disks/{key}/sha256", func(w http.ResponseWriter, r *http.Request) {
		key, ok := diskKey(w, r)
		if !ok {
			return
		}
		res, err := t.Checksum(r.PathValue("vm"), key)
		reply(w, res, err)
	})
	mux.HandleFunc("GET /v1/vms/{vm}/snapshots", func(w http.ResponseWriter, r *http.Request) {
		info, err := t.VM(r.PathValue("vm"))
		if err != nil {
			reply(w, nil, err)
			return
		}
		reply(w, info.Snapshots, nil)
	})
	mux.HandleFunc("GET /v1/vms/{vm}/snapshots/{snap}/disks/{key}/sha256", func(w http.ResponseWriter, r *http.Request) {
		key, ok := diskKey(w, r)
		if !ok {
			return
		}
		res, err := t.SnapshotChecksum(r.PathValue("vm"), r.PathValue("snap"), key)
		reply(w, res, err)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, ErrorResult{Error: fmt.Sprintf("no route for %s %s", r.Method, r.URL.Path)})
	})
	return mux
}

func diskKey(w http.ResponseWriter, r *http.Request) (int32, bool) {
	k, err := strconv.ParseInt(r.PathValue("key"), 10, 32)
	if err != nil {
		writeJSON(w, http.StatusBadRequest, ErrorResult{Error: fmt.Sprintf("disk key %q is not a number", r.PathValue("key"))})
		return 0, false
	}
	return int32(k), true
}

func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxRequestBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil && !errors.Is(err, io.EOF) {
		writeJSON(w, http.StatusBadRequest, ErrorResult{Error: "invalid request body: " + err.Error()})
		return false
	}
	return true
}

func reply(w http.ResponseWriter, v any, err error) {
	if err != nil {
		status := http.StatusInternalServerError
		var ae *apiError
		if errors.As(err, &ae) {
			status = ae.status
		}
		writeJSON(w, status, ErrorResult{Error: err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, v)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}
