;; Tries to open a file through WASI preview 1: refused at load.
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "oasis_buffer") (result i32) (i32.const 0))
  (func (export "oasis_from_host") (param i32))
  (func (export "oasis_from_entry") (param i32 i32)))
