;; Loops forever on the first packet: stopped at its CPU bound.
(module
  (memory (export "memory") 2)
  (func (export "oasis_buffer") (result i32) (i32.const 0))
  (func (export "oasis_from_host") (param i32) (loop $forever (br $forever)))
  (func (export "oasis_from_entry") (param i32 i32)))
