;; Returns a non-zero status after writing some output.
(module
  (import "internet2" "output" (func $output (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "failing")
  (func (export "run") (result i32)
    (drop (call $output (i32.const 0) (i32.const 7)))
    (i32.const 7)))
