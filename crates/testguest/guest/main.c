/* vhpc test guest: what it does is read from the kernel command line (see ../src/lib.rs).
 * Built with -mgeneral-regs-only: no x87/SSE/AVX instruction may appear (build.rs checks). */

#include "abi.h"

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

/* The PVH start info (xen/include/public/arch-x86/hvm/start_info.h), version 1. */
struct hvm_start_info {
	u32 magic, version, flags, nr_modules;
	u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
	u32 memmap_entries, reserved;
};
#define HVM_START_MAGIC 0x336ec578

/* What exception_handler() finds on the stack: pushed by isr_common, then the stub, then
 * the CPU. */
struct frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vector, error, rip, cs, rflags, rsp, ss;
};

struct tss64 {
	u32 reserved0;
	u64 rsp[3];
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3, iomap_base;
} __attribute__((packed));

extern u64 gdt[];
extern const u64 isr_table[32];

static struct tss64 tss[MAX_VCPUS] __attribute__((aligned(16)));
static u64 idt[256 * 2] __attribute__((aligned(16)));
static volatile u64 *const results = (volatile u64 *)RESULTS_ADDR;
static volatile u64 *const count_buf = (volatile u64 *)COUNT_BUF_ADDR;
static volatile u64 init_done;
static volatile u64 recover_rip, expected_vector;

/* gcc may emit calls to these for structure copies; there is no libc. */
void *memset(void *dst, int c, u64 n)
{
	u8 *d = dst;
	while (n--)
		*d++ = (u8)c;
	return dst;
}

void *memcpy(void *dst, const void *src, u64 n)
{
	u8 *d = dst;
	const u8 *s = src;
	while (n--)
		*d++ = *s++;
	return dst;
}

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }

static void putc(char c) { outb(SERIAL_PORT, (u8)c); }

static void puts(const char *s)
{
	while (*s)
		putc(*s++);
}

static void put_dec(u64 v)
{
	char buf[24];
	int i = 0;
	do {
		buf[i++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (i)
		putc(buf[--i]);
}

static void put_hex(u64 v)
{
	puts("0x");
	for (int shift = 60; shift >= 0; shift -= 4)
		putc("0123456789abcdef"[(v >> shift) & 0xf]);
}

static __attribute__((noreturn)) void debug_exit(u32 status)
{
	outl(DEBUG_EXIT_PORT, status);
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* ---- command line --------------------------------------------------------------------- */

struct config {
	u64 smp;	 /* smp=N: wait until N vCPUs run */
	u64 exception;	 /* raise and handle #UD, #DE and #PF */
	u64 dirty_mib;	 /* dirty=MIB: write into every stride-th page of MIB MiB at DIRTY_BASE */
	u64 dirty_stride;
	u64 count;	 /* count=N: N iterations; count=0 or count: forever */
	u64 counting;
	u64 halt;	 /* halt at the end instead of exiting */
	u64 exit_status; /* exit=N */
};

static int word_is(const char *w, u64 len, const char *key)
{
	u64 i = 0;
	for (; i < len && key[i]; i++)
		if (w[i] != key[i])
			return 0;
	return i == len && key[i] == 0;
}

static u64 parse_dec(const char *s, u64 len)
{
	u64 v = 0;
	for (u64 i = 0; i < len && s[i] >= '0' && s[i] <= '9'; i++)
		v = v * 10 + (u64)(s[i] - '0');
	return v;
}

static void apply(struct config *c, const char *w, u64 len)
{
	u64 eq = 0;
	while (eq < len && w[eq] != '=')
		eq++;
	const char *val = w + eq + 1;
	u64 vlen = eq < len ? len - eq - 1 : 0;
	if (word_is(w, eq, "smp"))
		c->smp = parse_dec(val, vlen);
	else if (word_is(w, eq, "exception"))
		c->exception = 1;
	else if (word_is(w, eq, "dirty"))
		c->dirty_mib = parse_dec(val, vlen);
	else if (word_is(w, eq, "stride"))
		c->dirty_stride = parse_dec(val, vlen);
	else if (word_is(w, eq, "count")) {
		c->counting = 1;
		c->count = parse_dec(val, vlen);
	} else if (word_is(w, eq, "halt"))
		c->halt = 1;
	else if (word_is(w, eq, "exit"))
		c->exit_status = parse_dec(val, vlen);
	/* Anything else (console=ttyS0 ...) is for other guests. */
}

static void parse_cmdline(struct config *c, const char *s)
{
	c->dirty_stride = 1;
	if (!s)
		return;
	while (*s) {
		while (*s == ' ')
			s++;
		const char *w = s;
		while (*s && *s != ' ')
			s++;
		if (s > w)
			apply(c, w, (u64)(s - w));
	}
}

/* ---- descriptor tables and exceptions ----------------------------------------------------- */

static void set_gate(int vec, u64 handler)
{
	/* present, DPL 0, 64-bit interrupt gate, selector 0x08 */
	idt[2 * vec] = (handler & 0xffff) | (0x08UL << 16) | (0x8eUL << 40) |
		       ((handler >> 16) & 0xffff) << 48;
	idt[2 * vec + 1] = handler >> 32;
}

static void load_tables(u32 cpu)
{
	u64 base = (u64)&tss[cpu];
	u64 limit = sizeof(struct tss64) - 1;
	tss[cpu].iomap_base = sizeof(struct tss64);
	gdt[3 + 2 * cpu] = (limit & 0xffff) | (base & 0xffffff) << 16 | 0x89UL << 40 |
			   ((limit >> 16) & 0xf) << 48 | ((base >> 24) & 0xff) << 56;
	gdt[4 + 2 * cpu] = base >> 32;
	u16 sel = (u16)(0x18 + 16 * cpu);
	__asm__ volatile("ltr %0" : : "r"(sel) : "memory");
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) idtr = { sizeof(idt) - 1, (u64)idt };
	__asm__ volatile("lidt %0" : : "m"(idtr) : "memory");
}

void exception_handler(struct frame *f)
{
	if (f->vector == expected_vector && recover_rip) {
		results[RES_EXCEPTIONS] |= 1UL << f->vector;
		f->rip = recover_rip;
		recover_rip = 0;
		return;
	}
	puts("vhpc-testguest: unexpected exception ");
	put_dec(f->vector);
	puts(" error ");
	put_hex(f->error);
	puts(" at rip ");
	put_hex(f->rip);
	putc('\n');
	debug_exit(EXIT_UNEXPECTED_EXCEPTION);
}

/* Each trigger records where to resume, then faults; the handler resumes there. */
static void raise_ud(void)
{
	expected_vector = 6;
	__asm__ volatile("lea 1f(%%rip), %%rax\n\tmov %%rax, %0\n\tud2\n1:"
			 : "=m"(recover_rip) : : "rax", "memory");
}

static void raise_de(void)
{
	expected_vector = 0;
	__asm__ volatile("lea 1f(%%rip), %%rax\n\tmov %%rax, %0\n\txor %%edx, %%edx\n\t"
			 "xor %%ecx, %%ecx\n\tdiv %%rcx\n1:"
			 : "=m"(recover_rip) : : "rax", "rcx", "rdx", "memory");
}

static void raise_pf(void)
{
	expected_vector = 14;
	/* 64 GiB: beyond the identity map, so not present. */
	__asm__ volatile("lea 1f(%%rip), %%rax\n\tmov %%rax, %0\n\tmovabs $0x1000000000, %%rcx\n\t"
			 "mov (%%rcx), %%rax\n1:"
			 : "=m"(recover_rip) : : "rax", "rcx", "memory");
}

static void exceptions(void)
{
	raise_ud();
	raise_de();
	raise_pf();
	puts("exception: #UD #DE #PF handled, mask ");
	put_hex(results[RES_EXCEPTIONS]);
	putc('\n');
}

/* ---- the work ------------------------------------------------------------------------------ */

static void dirty(u64 mib, u64 stride)
{
	u64 pages = mib << 20 >> 12, written = 0;
	if (!stride)
		stride = 1;
	for (u64 p = 0; p < pages; p += stride) {
		*(volatile u64 *)(DIRTY_BASE + p * PAGE_SIZE) = p ^ RESULTS_MAGIC;
		written++;
	}
	results[RES_DIRTY_PAGES] = written;
	puts("dirty: ");
	put_dec(written);
	puts(" pages\n");
}

/* checksum_i = (checksum_{i-1} ^ i) * PRIME; word i % COUNT_BUF_WORDS = checksum_i. */
static void count(u64 n)
{
	u64 i = results[RES_COUNTER], sum = results[RES_CHECKSUM];
	results[RES_PHASE] = PHASE_COUNTING;
	while (n == 0 || i < n) {
		i++;
		sum = (sum ^ i) * CHECKSUM_PRIME;
		count_buf[i % COUNT_BUF_WORDS] = sum;
		results[RES_CHECKSUM] = sum;
		results[RES_COUNTER] = i;
	}
	u64 mem = 0;
	for (u64 w = 0; w < COUNT_BUF_WORDS; w++)
		mem = (mem ^ count_buf[w]) * CHECKSUM_PRIME;
	puts("count: ");
	put_dec(i);
	puts(" checksum ");
	put_hex(sum);
	puts(" memory ");
	put_hex(mem);
	putc('\n');
}

static void wait_for_vcpus(u64 n)
{
	u64 spins = 0;
	for (;;) {
		int all = results[RES_VCPUS_UP] >= n;
		for (u64 i = 1; all && i < n; i++)
			all = results[RES_VCPU_COUNTERS + i] >= 100;
		if (all)
			break;
		if (++spins > 2000000) {
			puts("smp: only ");
			put_dec(results[RES_VCPUS_UP]);
			puts(" vcpus up\n");
			debug_exit(EXIT_SMP_TIMEOUT);
		}
	}
	puts("smp: ");
	put_dec(n);
	puts(" vcpus running\n");
}

static __attribute__((noreturn)) void secondary(u32 cpu)
{
	while (!init_done)
		;
	load_tables(cpu);
	__atomic_fetch_add(&results[RES_VCPUS_UP], 1, __ATOMIC_SEQ_CST);
	for (;;)
		results[RES_VCPU_COUNTERS + cpu]++;
}

void guest_main(const struct hvm_start_info *si, u32 cpu)
{
	if (cpu != 0)
		secondary(cpu);
	puts("vhpc-testguest: up\n");
	results[RES_MAGIC] = RESULTS_MAGIC;
	results[RES_PHASE] = PHASE_BOOT;

	struct config c = { 0 };
	if (si->magic == HVM_START_MAGIC && si->cmdline_paddr)
		parse_cmdline(&c, (const char *)si->cmdline_paddr);
	for (int v = 0; v < 32; v++)
		set_gate(v, isr_table[v]);
	load_tables(0);
	__atomic_fetch_add(&results[RES_VCPUS_UP], 1, __ATOMIC_SEQ_CST);
	init_done = 1;

	if (c.smp > 1)
		wait_for_vcpus(c.smp);
	if (c.exception)
		exceptions();
	if (c.dirty_mib)
		dirty(c.dirty_mib, c.dirty_stride);
	if (c.counting)
		count(c.count);
	results[RES_PHASE] = PHASE_DONE;
	if (c.halt) {
		puts("halt\n");
		results[RES_PHASE] = PHASE_HALTED;
		for (;;)
			__asm__ volatile("cli; hlt");
	}
	debug_exit((u32)c.exit_status);
}
