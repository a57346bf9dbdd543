;; Never returns: stopped by its fuel or by the deadline.
(module
  (memory (export "memory") 1)
  (func (export "run") (result i32)
    (loop $forever (br $forever))
    (i32.const 0)))
