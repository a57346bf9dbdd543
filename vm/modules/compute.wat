;; Ten million rounds of arithmetic and a branch: what fuel metering costs
;; on code that does nothing but compute (`internet2 vm-bench`).
(module
  (memory (export "memory") 1)
  (func (export "run") (result i32)
    (local $i i32) (local $acc i32)
    (local.set $i (i32.const 10000000))
    (loop $more
      (local.set $acc (i32.add (i32.mul (local.get $acc) (i32.const 31)) (local.get $i)))
      (local.set $i (i32.sub (local.get $i) (i32.const 1)))
      (br_if $more (local.get $i)))
    ;; 0, but only once the loop's result is known.
    (i32.mul (local.get $acc) (i32.const 0))))
