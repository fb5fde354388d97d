;; Answers one packet with an endless stream of sends: the first few go,
;; then it is refused, then stopped.
(module
  (import "oasis" "send" (func $send (param i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "oasis_buffer") (result i32) (i32.const 0))
  (func (export "oasis_from_host") (param $len i32)
    (loop $again (drop (call $send (i32.const 0) (i32.const 0) (local.get $len))) (br $again)))
  (func (export "oasis_from_entry") (param i32 i32)))
