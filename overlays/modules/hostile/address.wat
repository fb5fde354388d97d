;; Tries to send to an address the overlay did not declare: the contract
;; names entry nodes by index, so the nearest it can come is an index past
;; the list (and a negative one). Refused, counted; nothing is sent.
(module
  (import "oasis" "send" (func $send (param i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "oasis_buffer") (result i32) (i32.const 0))
  (func (export "oasis_from_host") (param $len i32)
    (drop (call $send (i32.const 7) (i32.const 0) (local.get $len)))
    (drop (call $send (i32.const -1) (i32.const 0) (local.get $len)))
    ;; and a buffer outside its memory
    (drop (call $send (i32.const 0) (i32.const 2000000) (local.get $len))))
  (func (export "oasis_from_entry") (param i32 i32)))
