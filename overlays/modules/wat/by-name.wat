;; A monitor module in a page of WAT: a rule's metric names the overlay its
;; flows take (`oasis rule add ... --metric exit --monitor NAME` sends them
;; over the overlay joined as `exit`); a metric naming no joined overlay
;; sends them to the underlay. Answers go to this host as they came.
(module
  (import "oasis" "via" (func $via (param i32 i32 i32) (result i32)))
  (import "oasis" "overlays" (func $overlays (result i32)))
  (import "oasis" "overlay_name" (func $name (param i32 i32 i32) (result i32)))
  (import "oasis" "to_host" (func $to_host (param i32 i32) (result i32)))
  (import "oasis" "to_underlay" (func $to_underlay (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $shim (mut i32) (i32.const 0))
  ;; Names are read to 512, packets written to 1024.
  (func (export "oasis_buffer") (result i32) (i32.const 1024))
  (func (export "oasis_start") (param $overlays i32) (param $shim i32) (result i32)
    (global.set $shim (local.get $shim))
    (i32.const 0))
  ;; Whether the metric (zero-padded to the shim's length) is the name of
  ;; `len` bytes at 512.
  (func $is_metric (param $len i32) (result i32) (local $i i32)
    (if (i32.gt_u (local.get $len) (global.get $shim)) (then (return (i32.const 0))))
    (block $differ
      (loop $next
        (br_if $differ (i32.ge_u (local.get $i) (local.get $len)))
        (if (i32.ne (i32.load8_u (i32.add (i32.const 512) (local.get $i)))
                    (i32.load8_u (i32.add (i32.const 1024) (local.get $i))))
          (then (return (i32.const 0))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.or (i32.eq (local.get $len) (global.get $shim))
            (i32.eqz (i32.load8_u (i32.add (i32.const 1024) (local.get $len))))))
  ;; The index of the overlay the metric names, or -1.
  (func $named (result i32) (local $i i32) (local $len i32)
    (block $none
      (loop $next
        (br_if $none (i32.ge_s (local.get $i) (call $overlays)))
        (local.set $len (call $name (local.get $i) (i32.const 512) (i32.const 256)))
        (if (i32.and (i32.ge_s (local.get $len) (i32.const 0))
                     (call $is_metric (local.get $len)))
          (then (return (local.get $i))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.const -1))
  (func (export "oasis_from_host") (param $len i32) (local $overlay i32) (local $packet i32) (local $size i32)
    (if (i32.lt_u (local.get $len) (global.get $shim)) (then (return)))
    (local.set $packet (i32.add (i32.const 1024) (global.get $shim)))
    (local.set $size (i32.sub (local.get $len) (global.get $shim)))
    (local.set $overlay (call $named))
    (if (i32.ge_s (local.get $overlay) (i32.const 0))
      (then (drop (call $via (local.get $overlay) (local.get $packet) (local.get $size))))
      (else (drop (call $to_underlay (local.get $packet) (local.get $size))))))
  (func (export "oasis_from_overlay") (param $overlay i32) (param $len i32)
    (drop (call $to_host (i32.const 1024) (local.get $len)))))
