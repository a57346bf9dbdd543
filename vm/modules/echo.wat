;; Copies the call's input to its output, 4 KiB at a time.
(module
  (import "internet2" "input" (func $input (param i32 i32) (result i32)))
  (import "internet2" "output" (func $output (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "run") (result i32)
    (local $n i32)
    (block $done
      (loop $more
        (local.set $n (call $input (i32.const 0) (i32.const 4096)))
        (br_if $done (i32.le_s (local.get $n) (i32.const 0)))
        (if (i32.lt_s (call $output (i32.const 0) (local.get $n)) (i32.const 0))
          (then (return (i32.const 2))))
        (br $more)))
    (i32.const 0)))
