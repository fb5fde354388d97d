;; Hands the underlay a packet claiming another host's source (192.0.2.99)
;; for each packet the host gives it: the sandbox passes it on, and its
;; runner refuses it (it is of no flow the host handed the module).
(module
  (import "oasis" "to_underlay" (func $to_underlay (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  ;; An IPv4/UDP header from 192.0.2.99 to 10.77.2.2, port 9 to 9, 8 bytes.
  (data (i32.const 70000)
    "\45\00\00\1c\00\00\40\00\40\11\00\00\c0\00\02\63\0a\4d\02\02\00\09\00\09\00\08\00\00")
  (func (export "oasis_buffer") (result i32) (i32.const 0))
  (func (export "oasis_from_host") (param i32)
    (drop (call $to_underlay (i32.const 70000) (i32.const 28))))
  (func (export "oasis_from_entry") (param i32 i32)))
