;; The paper's OC0, and more: hands the underlay each packet the host gave
;; it (allowed: a packet of a flow it was handed), and on every tick two
;; packets of its own making with this host's address as their source (in
;; the network namespace tests, 10.77.1.2): a TCP SYN to the router's port
;; 22 and a UDP datagram to the server's port 9. Neither is of a flow the
;; host handed it, so its runner refuses both, and counts them.
(module
  (import "oasis" "to_underlay" (func $to_underlay (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  ;; IPv4/TCP SYN 10.77.1.2:40000 -> 10.77.1.1:22.
  (data (i32.const 70000)
    "\45\00\00\28\00\00\40\00\40\06\00\00\0a\4d\01\02\0a\4d\01\01"
    "\9c\40\00\16\00\00\00\01\00\00\00\00\50\02\ff\ff\00\00\00\00")
  ;; IPv4/UDP 10.77.1.2:9 -> 10.77.2.2:9, 4 bytes.
  (data (i32.const 70100)
    "\45\00\00\20\00\00\40\00\40\11\00\00\0a\4d\01\02\0a\4d\02\02"
    "\00\09\00\09\00\0c\00\00\78\78\78\78")
  (func (export "oasis_buffer") (result i32) (i32.const 0))
  (func (export "oasis_from_host") (param i32)
    (drop (call $to_underlay (i32.const 0) (local.get 0))))
  (func (export "oasis_from_entry") (param i32 i32))
  (func (export "oasis_tick") (param i64)
    (drop (call $to_underlay (i32.const 70000) (i32.const 40)))
    (drop (call $to_underlay (i32.const 70100) (i32.const 32)))))
