;; Grows its memory a page at a time until refused: stopped by the VM's
;; memory limit.
(module
  (memory (export "memory") 1)
  (func (export "run") (result i32)
    (loop $more
      (br_if $more (i32.ge_s (memory.grow (i32.const 1)) (i32.const 0))))
    (i32.const 3)))
