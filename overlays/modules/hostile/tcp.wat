;; Tries to open a TCP connection through WASI sockets: refused at load,
;; since the sandbox offers no WASI at all.
(module
  (import "wasi:sockets/tcp@0.2.0" "[method]tcp-socket.start-connect" (func $connect (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "oasis_buffer") (result i32) (i32.const 0))
  (func (export "oasis_from_host") (param i32) (drop (call $connect (i32.const 0) (i32.const 0))))
  (func (export "oasis_from_entry") (param i32 i32)))
