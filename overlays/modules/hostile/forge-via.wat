;; A monitor module that sends, over the first joined overlay, a packet
;; claiming another host's source (192.0.2.99) for every packet it gets:
;; the sandbox passes it on, and the module's runner refuses it (only the
;; packets of flows the host handed it may use the user's overlays),
;; counting it in `oasis overlay show`. The host's own packets it hands to
;; the underlay.
(module
  (import "oasis" "via" (func $via (param i32 i32 i32) (result i32)))
  (import "oasis" "to_underlay" (func $to_underlay (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $shim (mut i32) (i32.const 0))
  ;; An IPv4/UDP header from 192.0.2.99 to 10.77.2.2, port 9 to 9, 8 bytes.
  (data (i32.const 70000)
    "\45\00\00\1c\00\00\40\00\40\11\00\00\c0\00\02\63\0a\4d\02\02\00\09\00\09\00\08\00\00")
  (func (export "oasis_buffer") (result i32) (i32.const 0))
  (func (export "oasis_start") (param i32) (param $shim i32) (result i32)
    (global.set $shim (local.get $shim))
    (i32.const 0))
  (func (export "oasis_from_host") (param $len i32)
    (drop (call $via (i32.const 0) (i32.const 70000) (i32.const 28)))
    (drop (call $to_underlay (global.get $shim) (i32.sub (local.get $len) (global.get $shim)))))
  (func (export "oasis_from_overlay") (param i32 i32)))
