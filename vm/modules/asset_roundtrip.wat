;; The input is a 16-byte asset address, then bytes to store: writes them
;; at offset 0 of that asset (memory or storage), reads them back into
;; other memory and outputs what it read. Returns the negative error of a failed call.
(module
  (import "internet2" "input" (func $input (param i32 i32) (result i32)))
  (import "internet2" "output" (func $output (param i32 i32) (result i32)))
  (import "internet2" "asset_write" (func $write (param i32 i64 i32 i32) (result i32)))
  (import "internet2" "asset_read" (func $read (param i32 i64 i32 i32) (result i32)))
  (import "internet2" "log" (func $log (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 60000) "round trip done")
  (func (export "run") (result i32)
    (local $n i32) (local $r i32)
    ;; address at 0..16, data at 16..
    (local.set $n (call $input (i32.const 0) (i32.const 32768)))
    (if (i32.lt_s (local.get $n) (i32.const 17)) (then (return (i32.const 1))))
    (local.set $n (i32.sub (local.get $n) (i32.const 16)))
    (local.set $r (call $write (i32.const 0) (i64.const 0) (i32.const 16) (local.get $n)))
    (if (i32.ne (local.get $r) (local.get $n)) (then (return (local.get $r))))
    (local.set $r (call $read (i32.const 0) (i64.const 0) (i32.const 32768) (local.get $n)))
    (if (i32.ne (local.get $r) (local.get $n)) (then (return (local.get $r))))
    (call $log (i32.const 60000) (i32.const 15))
    (drop (call $output (i32.const 32768) (local.get $n)))
    (i32.const 0)))
