;; Recurses without end: stopped when its stack is exhausted (a trap).
(module
  (memory (export "memory") 1)
  (func $down (param i64) (result i64)
    (i64.add (call $down (i64.add (local.get 0) (i64.const 1))) (i64.const 1)))
  (func (export "run") (result i32)
    (drop (call $down (i64.const 0)))
    (i32.const 0)))
