package cbtsim

import (
	"encoding/json"
	"encoding/xml"
	"fmt"
	"log"
	"net/http"
	"runtime/debug"
	"strings"
	"sync/atomic"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

// PanicMarker starts the log line of every panic the server survived. A panic is always a
// bug of the simulator (a request vCenter would answer with a fault): tests fail when the
// server's log contains this marker (or when Server.Panics is not zero).
const PanicMarker = "SIMULATOR PANIC:"

// panicNet keeps a panic in a SOAP call, a simulator task or a control API call from killing
// the process, and makes it loud.
//
// govmomi's simulator does not recover: a panic in a task body (a goroutine of its own)
// ends the process, and one in a SOAP call is only caught by net/http, which drops the
// connection and logs "http: panic serving". Surviving is a last resort: the simulator's
// Registry.WithLock does not release its lock on a panic, so an object locked inside the
// panicking code (a VM, typically) may stay locked and later calls on it hang. Hence the
// marker: the run that hit it has failed, whatever happens next.
type panicNet struct {
	logger *log.Logger
	count  atomic.Int64
}

func newPanicNet(logger *log.Logger) *panicNet {
	if logger == nil {
		logger = log.Default() // never silent, even when the embedder passed no logger
	}
	return &panicNet{logger: logger}
}

// report logs one recovered panic: the marker line, then the stack of the panicking goroutine.
func (n *panicNet) report(where string, r any) {
	n.count.Add(1)
	n.logger.Printf("%s %s: %v\n%s", PanicMarker, where, r, debug.Stack())
}

// guardTask makes a panic in a task body the task's error (SystemError) instead of the end
// of the process. The simulator's Task.Run releases the task's lock after the body returns,
// so a recovered body leaves the entity unlocked unless the body locked it again itself.
// It must run before the task's goroutine starts (the registry's PutObject hook does).
func (n *panicNet) guardTask(t *simulator.Task) {
	body := t.Execute
	where := fmt.Sprintf("task %s (%s)", t.Info.DescriptionId, t.Self.Value)
	if t.Info.Entity != nil {
		where += " on " + t.Info.Entity.Value
	}
	t.Execute = func(task *simulator.Task) (res types.AnyType, fault types.BaseMethodFault) {
		defer func() {
			if r := recover(); r != nil {
				n.report(where, r)
				res, fault = nil, &types.SystemError{Reason: fmt.Sprint(r)}
			}
		}()
		return body(task)
	}
}

// recoverCall runs f; a panic becomes a SystemError fault (nil when f returned normally).
func (n *panicNet) recoverCall(where string, f func()) (fault *types.SystemError) {
	defer func() {
		if r := recover(); r != nil {
			n.report(where, r)
			fault = &types.SystemError{Reason: fmt.Sprint(r)}
		}
	}()
	f()
	return nil
}

// handler recovers a panic of next, logs it and, when nothing was written yet, answers
// with answer (a SOAP fault or a JSON error).
func (n *panicNet) handler(what string, next http.Handler, answer func(http.ResponseWriter, string)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec := &recordingWriter{ResponseWriter: w}
		defer func() {
			p := recover()
			if p == nil {
				return
			}
			if p == http.ErrAbortHandler {
				panic(p) // net/http's own way to abort a response, not a bug
			}
			n.report(fmt.Sprintf("%s %s %s", what, r.Method, r.URL.Path), p)
			if !rec.wrote {
				answer(w, fmt.Sprint(p))
			}
		}()
		next.ServeHTTP(rec, r)
	})
}

// recordingWriter notes whether the response was started.
type recordingWriter struct {
	http.ResponseWriter
	wrote bool
}

func (w *recordingWriter) WriteHeader(code int) {
	w.wrote = true
	w.ResponseWriter.WriteHeader(code)
}

func (w *recordingWriter) Write(b []byte) (int, error) {
	w.wrote = true
	return w.ResponseWriter.Write(b)
}

// Flush keeps http.Flusher working through the wrapper.
func (w *recordingWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		w.wrote = true
		f.Flush()
	}
}

// soapSystemError answers a SOAP call with vCenter's fault for an internal error.
func soapSystemError(w http.ResponseWriter, reason string) {
	var esc strings.Builder
	if err := xml.EscapeText(&esc, []byte(reason)); err != nil {
		esc.Reset()
		esc.WriteString("internal error")
	}
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(http.StatusInternalServerError)
	fmt.Fprintf(w, `<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>A general system error occurred: %[1]s</faultstring><detail><SystemErrorFault xmlns="urn:vim25" xsi:type="SystemError"><reason>%[1]s</reason></SystemErrorFault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>`,
		esc.String())
}

// jsonInternalError answers a control API call whose handler panicked.
func jsonInternalError(w http.ResponseWriter, reason string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusInternalServerError)
	_ = json.NewEncoder(w).Encode(ErrorResult{Error: "internal error: " + reason})
}
