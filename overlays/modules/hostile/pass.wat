;; The smallest module that keeps the contract: every packet from the host
;; goes to entry node 0 as it is, every datagram from an entry node back to
;; the host. (The Rust pass-through module does the same with flow hashing.)
(module
  (import "oasis" "send" (func $send (param i32 i32 i32) (result i32)))
  (import "oasis" "to_host" (func $to_host (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "oasis_buffer") (result i32) (i32.const 0))
  (func (export "oasis_from_host") (param $len i32)
    (drop (call $send (i32.const 0) (i32.const 0) (local.get $len))))
  (func (export "oasis_from_entry") (param $entry i32) (param $len i32)
    (drop (call $to_host (i32.const 0) (local.get $len)))))
