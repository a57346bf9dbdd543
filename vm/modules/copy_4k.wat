;; The input is a 16-byte memory asset address, a mode byte and a count
;; (u32, little-endian). Mode 0 reads 4 KiB of the asset into the guest's
;; memory `count` times (asset_read); mode 1 copies 4 KiB within the
;; guest's memory `count` times (memory.copy): `internet2 vm-bench`
;; compares the two.
(module
  (import "internet2" "input" (func $input (param i32 i32) (result i32)))
  (import "internet2" "asset_read" (func $read (param i32 i64 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "run") (result i32)
    (local $n i32) (local $mode i32)
    (if (i32.ne (call $input (i32.const 0) (i32.const 21)) (i32.const 21))
      (then (return (i32.const 1))))
    (local.set $mode (i32.load8_u (i32.const 16)))
    (local.set $n (i32.load (i32.const 17)))
    (block $done
      (loop $more
        (br_if $done (i32.eqz (local.get $n)))
        (if (local.get $mode)
          (then (memory.copy (i32.const 8192) (i32.const 65536) (i32.const 4096)))
          (else
            (if (i32.ne
                  (call $read (i32.const 0) (i64.const 0) (i32.const 8192) (i32.const 4096))
                  (i32.const 4096))
              (then (return (i32.const 2))))))
        (local.set $n (i32.sub (local.get $n) (i32.const 1)))
        (br $more)))
    (i32.const 0)))
