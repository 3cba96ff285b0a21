/* vhpc test guest: ELF notes, the PVH entry (32-bit protected mode, paging off, EBX = the
 * hvm_start_info), the switch to 64-bit mode on static identity page tables, and the
 * exception stubs. General-purpose registers only: see ../src/lib.rs. */

#include "abi.h"

#define CODE64_SEL 0x08
#define DATA_SEL 0x10
/* PG | AM | WP | NE | ET | MP | PE */
#define CR0_VALUE 0x80050033
/* OSXMMEXCPT | OSFXSR | PAE */
#define CR4_VALUE 0x620
/* NXE | LME | SCE; the CPU sets LMA when paging comes on */
#define EFER_VALUE 0x901
#define MSR_EFER 0xc0000080

	/* One PT_NOTE segment: the PVH entry (what every PVH-capable VMM looks for) and the
	 * vhpc note that says what this guest needs. */
	.section .note.guest, "a"
	.balign 4
	.long 4, 4, 18			/* "Xen", 4 bytes, XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.long pvh_entry
	.balign 4
	.long 5, 4, VHPC_NOTE_TYPE	/* "vhpc", 4 bytes, flags */
	.asciz "vhpc"
	.balign 4
	.long VHPC_NOTE_GENERAL_REGS_ONLY | VHPC_NOTE_ALL_VCPUS_AT_ENTRY

	/* 32-bit code lives in its own section so it can be disassembled as such. */
	.section .text32, "ax"
	.code32
	.globl pvh_entry
pvh_entry:
	cli
	cld
	mov %ebx, %edi			/* the hvm_start_info: guest_main's first argument */
	mov $1, %eax
	cpuid
	shr $24, %ebx			/* initial APIC ID = vCPU index */
	mov %ebx, %esi			/* guest_main's second argument */
	cmp $MAX_VCPUS, %esi
	jae 9f
	mov $pml4, %eax
	mov %eax, %cr3
	mov $CR4_VALUE, %eax
	mov %eax, %cr4
	mov $MSR_EFER, %ecx
	mov $EFER_VALUE, %eax
	xor %edx, %edx
	wrmsr
	lgdt gdt_ptr
	mov $CR0_VALUE, %eax
	mov %eax, %cr0
	ljmp $CODE64_SEL, $long_mode
9:	mov $DEBUG_EXIT_PORT, %dx
	mov $EXIT_TOO_MANY_VCPUS, %eax
	outl %eax, %dx
8:	hlt
	jmp 8b

	.section .text, "ax"
	.code64
long_mode:
	mov $DATA_SEL, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	mov %eax, %fs
	mov %eax, %gs
	mov %edi, %edi			/* zero-extend both arguments */
	mov %esi, %esi
	lea 1(%rsi), %rax
	shl $STACK_SHIFT, %rax
	lea stacks(%rax), %rsp		/* top of this vCPU's stack */
	xor %ebp, %ebp
	call guest_main
1:	cli
	hlt
	jmp 1b

	/* Exception stubs: push a zero error code where the CPU pushes none, then the vector,
	 * then every general register; exception_handler() gets a pointer to that frame. */
	.macro stub vec, has_error
	.balign 16
isr\vec:
	.if \has_error == 0
	pushq $0
	.endif
	pushq $\vec
	jmp isr_common
	.endm

	stub 0, 0
	stub 1, 0
	stub 2, 0
	stub 3, 0
	stub 4, 0
	stub 5, 0
	stub 6, 0
	stub 7, 0
	stub 8, 1
	stub 9, 0
	stub 10, 1
	stub 11, 1
	stub 12, 1
	stub 13, 1
	stub 14, 1
	stub 15, 0
	stub 16, 0
	stub 17, 1
	stub 18, 0
	stub 19, 0
	stub 20, 0
	stub 21, 1
	stub 22, 0
	stub 23, 0
	stub 24, 0
	stub 25, 0
	stub 26, 0
	stub 27, 0
	stub 28, 0
	stub 29, 1
	stub 30, 1
	stub 31, 0

isr_common:
	push %rax
	push %rbx
	push %rcx
	push %rdx
	push %rsi
	push %rdi
	push %rbp
	push %r8
	push %r9
	push %r10
	push %r11
	push %r12
	push %r13
	push %r14
	push %r15
	mov %rsp, %rdi			/* 16-byte aligned here: 40 + 16 + 120 bytes pushed */
	call exception_handler
	pop %r15
	pop %r14
	pop %r13
	pop %r12
	pop %r11
	pop %r10
	pop %r9
	pop %r8
	pop %rbp
	pop %rdi
	pop %rsi
	pop %rdx
	pop %rcx
	pop %rbx
	pop %rax
	add $16, %rsp			/* vector and error code */
	iretq

	.section .rodata
	.balign 8
	.globl isr_table
isr_table:
	.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.quad isr\v
	.endr

	.section .data
	.balign 16
	.globl gdt
gdt:
	.quad 0
	.quad 0x00af9b000000ffff	/* 0x08: 64-bit code, DPL 0 */
	.quad 0x00cf93000000ffff	/* 0x10: flat data */
	.fill MAX_VCPUS * 2, 8, 0	/* 0x18 + 16 * i: vCPU i's TSS, filled by guest_main */
gdt_end:
gdt_ptr:
	.word gdt_end - gdt - 1
	.long gdt

	/* Identity map of the first 4 GiB with 2 MiB pages, built by the assembler so that
	 * booting costs no page-table loop (every instruction is emulated on kvm_pvm). */
	.section .data.pagetables, "aw"
	.balign 4096
pml4:
	.quad pdpt + 0x3
	.fill 511, 8, 0
pdpt:
	.quad pd + 0x0003
	.quad pd + 0x1003
	.quad pd + 0x2003
	.quad pd + 0x3003
	.fill 508, 8, 0
pd:
	.set page, 0
	.rept 2048
	.quad (page << 21) | 0x83
	.set page, page + 1
	.endr

	.section .bss
	.balign 4096
stacks:
	.skip MAX_VCPUS << STACK_SHIFT

	.section .note.GNU-stack, "", @progbits
