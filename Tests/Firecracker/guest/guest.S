/*
 * UffdKit's Firecracker test guest: a bare-metal x86-64 program (no kernel), entered by
 * Firecracker's Linux 64-bit boot path in long mode with the low 1 GiB identity-mapped.
 *
 * Boot:    fill every page of the test region (REGION_BASE, REGION_PAGES pages) with its own
 *          pattern: the first qword of the page at address a is H(a), the last is ~H(a),
 *          H(a) = (a ^ SEED) * 0x9E3779B97F4A7C15. Print "UFG FILLED <pages>", then
 *          "UFG READY" and spin on the mailbox. The rig pauses and snapshots the VM here.
 * Restore: the rig writes GO_MAGIC and the pass's parameters into the mailbox page of the
 *          memory file before the restore; the restored guest sees them, prints "UFG GO",
 *          reads `npages` pages of the region (mode 0: pages 0..npages-1 in order; mode 1: page
 *          (i * stride) mod REGION_PAGES, a fixed scattered order when stride is odd), checks
 *          both qwords of each page and prints "UFG OK <pages> <sum>" (sum = wrapping sum of
 *          every H(a) read) or "UFG BAD <bad pages> <first bad address>", then halts; with
 *          `passes` > 1 it repeats a good pass (later passes find their memory present, which
 *          separates the guest's own cost from the cost of bringing the memory in).
 * PVM (the software hypervisor here) emulates this code at ~1-2 us per instruction, so the
 * per-page work is a handful of instructions: the region is filled and checked per page, not
 * per byte. Numbers are printed in hex on the serial port (0x3f8), which is Firecracker's stdout.
 */
    .intel_syntax noprefix
    .code64

    .equ SERIAL, 0x3f8
    .equ REGION_BASE, 0x2000000            /* 32 MiB */
    .equ REGION_PAGES, 32768               /* 128 MiB of 4 KiB pages */
    .equ GO_MAGIC, 0x5546464b49544f47      /* "GOTIKFFU" */
    .equ MULT, 0x9E3779B97F4A7C15
    .equ SEED, 0x5EED0F1CA7C0FFEE

    .section .mailbox, "aw"
    .globl mailbox
mailbox:
mb_go:       .quad 0                       /* +0  GO_MAGIC when the rig wants a pass */
mb_mode:     .quad 0                       /* +8  0 sequential, 1 scattered */
mb_npages:   .quad 8192                    /* +16 pages to read */
mb_stride:   .quad 1                       /* +24 odd multiplier for mode 1 */
mb_delay:    .quad 0                       /* +32 spin iterations after each page (slows a pass down) */
mb_progress: .quad 0                       /* +40 if not 0: print "UFG P <i>" when (i & mask) == 0 */
mb_passes:   .quad 1                       /* +48 passes (the 2nd and later run on memory already present) */

    .section .text
    .globl _start
_start:
    cli
    lea rsp, [rip + stack_top]
    lea rsi, [rip + s_boot]
    call puts

    /* Fill: r8 = page address, r9 = pages left. */
    mov r8, REGION_BASE
    mov r9, REGION_PAGES
    movabs r10, SEED
    movabs r11, MULT
1:  mov rax, r8
    xor rax, r10
    imul rax, r11
    mov [r8], rax
    not rax
    mov [r8 + 4088], rax
    add r8, 4096
    dec r9
    jnz 1b

    lea rsi, [rip + s_filled]
    call puts
    mov rax, REGION_PAGES
    call puthex
    call putnl
    lea rsi, [rip + s_ready]
    call puts

    /* Wait for the rig's command (it arrives through the restored memory). */
    movabs rax, GO_MAGIC
2:  pause
    cmp [rip + mb_go], rax
    jne 2b

    lea rsi, [rip + s_go]
    call puts
    mov rax, [rip + mb_passes]
    mov [rip + passes_left], rax

    /* The pass: rcx = i, r12 = sum, r13 = bad pages, r14 = first bad address. */
pass:
    xor ecx, ecx
    xor r12d, r12d
    xor r13d, r13d
    xor r14d, r14d
    movabs r10, SEED
    movabs r11, MULT
    mov r15, [rip + mb_npages]
3:  cmp rcx, r15
    jae 7f
    mov rax, rcx
    cmp qword ptr [rip + mb_mode], 0
    je 4f
    imul rax, [rip + mb_stride]
4:  and rax, REGION_PAGES - 1
    shl rax, 12
    add rax, REGION_BASE
    mov r8, rax                     /* page address */
    xor rax, r10
    imul rax, r11                   /* H(a) */
    mov rdx, [r8]
    mov rbx, [r8 + 4088]
    add r12, rdx
    cmp rdx, rax
    jne 5f
    not rax
    cmp rbx, rax
    je 6f
5:  test r13, r13
    jnz 55f
    mov r14, r8
55: inc r13
6:  mov rdx, [rip + mb_delay]
    test rdx, rdx
    jz 65f
61: pause
    dec rdx
    jnz 61b
65: mov rdx, [rip + mb_progress]
    test rdx, rdx
    jz 69f
    test rcx, rdx
    jnz 69f
    push rcx
    lea rsi, [rip + s_progress]
    call puts
    mov rax, [rsp]
    call puthex
    call putnl
    pop rcx
69: inc rcx
    jmp 3b

7:  test r13, r13
    jnz 8f
    lea rsi, [rip + s_ok]
    call puts
    mov rax, r15
    call puthex
    call putsp
    mov rax, r12
    call puthex
    call putnl
    dec qword ptr [rip + passes_left]
    jg pass
    jmp halt
8:  lea rsi, [rip + s_bad]
    call puts
    mov rax, r13
    call puthex
    call putsp
    mov rax, r14
    call puthex
    call putnl
halt:
    hlt
    jmp halt

/* puts: rsi = NUL-terminated string. Clobbers rax, rdx, rsi. */
puts:
    mov dx, SERIAL
1:  lodsb
    test al, al
    jz 2f
    out dx, al
    jmp 1b
2:  ret

/* puthex: rax as 16 hex digits. Clobbers rax, rcx, rdx, rdi. */
puthex:
    mov rdi, rax
    mov ecx, 16
    mov dx, SERIAL
1:  rol rdi, 4
    mov eax, edi
    and eax, 15
    cmp eax, 10
    jb 2f
    add eax, 'a' - 10 - '0'
2:  add eax, '0'
    out dx, al
    dec ecx
    jnz 1b
    ret

putnl:
    mov al, 10
    mov dx, SERIAL
    out dx, al
    ret

putsp:
    mov al, ' '
    mov dx, SERIAL
    out dx, al
    ret

    .section .rodata
s_boot:     .asciz "UFG BOOT\n"
s_filled:   .asciz "UFG FILLED "
s_ready:    .asciz "UFG READY\n"
s_go:       .asciz "UFG GO\n"
s_progress: .asciz "UFG P "
s_ok:       .asciz "UFG OK "
s_bad:      .asciz "UFG BAD "

    .section .bss
    .balign 16
passes_left:
    .quad 0
stack:
    .skip 8192
stack_top:
