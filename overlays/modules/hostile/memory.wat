;; Grows its memory without end on the first packet: stopped at its limit.
(module
  (memory (export "memory") 2)
  (func (export "oasis_buffer") (result i32) (i32.const 0))
  (func (export "oasis_from_host") (param i32)
    (loop $more (drop (memory.grow (i32.const 256))) (br $more)))
  (func (export "oasis_from_entry") (param i32 i32)))
