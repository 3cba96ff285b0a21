//! The contract between the test guest and the host: ports, guest-physical addresses, the
//! layout of the results page and the guest's arithmetic. `build.rs` turns every `pub const`
//! here into `abi.h` for the guest's C and assembly, so the two sides cannot drift apart.
//!
//! ```text
//! 0x0010_0000  the guest image: note, text, data (GDT, page tables), bss (IDT, TSSs, stacks)
//! 0x001c_0000  results page: words the guest keeps up to date for the host to read
//! 0x0020_0000  count buffer: COUNT_BUF_WORDS u64 words written by `count`
//! 0x0040_0000  dirty area: `dirty=MIB` writes one word into every STRIDE-th 4 KiB page
//! ```

/// The first serial port: every byte written is one line of output on the host's console.
pub const SERIAL_PORT: u64 = 0x3f8;
/// The debug-exit port (QEMU's isa-debug-exit convention): a write ends the VM with a status.
pub const DEBUG_EXIT_PORT: u64 = 0xf4;

/// The most vCPUs the guest has stacks, TSSs and counters for.
pub const MAX_VCPUS: u64 = 16;
/// log2 of each vCPU's stack size.
pub const STACK_SHIFT: u64 = 14;

/// Where the linker places the image.
pub const IMAGE_START: u64 = 0x10_0000;
/// The image must end below this address (the linker script asserts it).
pub const IMAGE_LIMIT: u64 = 0x1c_0000;
/// The results page.
pub const RESULTS_ADDR: u64 = 0x1c_0000;
/// The count buffer.
pub const COUNT_BUF_ADDR: u64 = 0x20_0000;
/// Words in the count buffer (64 KiB: 16 pages, quick for the guest to checksum).
pub const COUNT_BUF_WORDS: u64 = 0x2000;
/// Start of the area `dirty=MIB` writes to.
pub const DIRTY_BASE: u64 = 0x40_0000;
/// Guest page size for the dirty pattern.
pub const PAGE_SIZE: u64 = 0x1000;

/// Word indices into the results page.
pub const RES_MAGIC: u64 = 0;
/// The `count` loop's counter: iterations completed.
pub const RES_COUNTER: u64 = 1;
/// The `count` loop's running checksum.
pub const RES_CHECKSUM: u64 = 2;
/// vCPUs that have reached 64-bit mode and checked in.
pub const RES_VCPUS_UP: u64 = 3;
/// Pages written by `dirty=`.
pub const RES_DIRTY_PAGES: u64 = 4;
/// Bit v set: exception vector v was raised on purpose and handled.
pub const RES_EXCEPTIONS: u64 = 5;
/// What the guest is doing now (one of the PHASE_* values).
pub const RES_PHASE: u64 = 6;
/// First of MAX_VCPUS per-vCPU loop counters (vCPU i at RES_VCPU_COUNTERS + i).
pub const RES_VCPU_COUNTERS: u64 = 8;

/// "VHPCTG01": the guest has started and the results page is live.
pub const RESULTS_MAGIC: u64 = 0x3130_4754_4350_4856;

pub const PHASE_BOOT: u64 = 0;
pub const PHASE_COUNTING: u64 = 1;
pub const PHASE_DONE: u64 = 2;
pub const PHASE_HALTED: u64 = 3;

/// Exit statuses the guest reports through the debug-exit port besides `exit=N`.
pub const EXIT_SMP_TIMEOUT: u64 = 0x72;
pub const EXIT_UNEXPECTED_EXCEPTION: u64 = 0x73;
pub const EXIT_TOO_MANY_VCPUS: u64 = 0x74;

/// The ELF note that marks a vhpc freestanding guest: owner "vhpc", this type, and a u32
/// descriptor of VHPC_NOTE_* flags.
pub const VHPC_NOTE_TYPE: u64 = 0x5648_0001;
/// The guest uses general-purpose registers only (no x87/SSE/AVX, no int3, no xgetbv): it can
/// run on an emulating KVM backend such as kvm_pvm.
pub const VHPC_NOTE_GENERAL_REGS_ONLY: u64 = 1;
/// Every vCPU enters at the PVH entry point (no INIT/SIPI needed): vCPU i finds its index in
/// its APIC ID.
pub const VHPC_NOTE_ALL_VCPUS_AT_ENTRY: u64 = 2;

/// The multiplier of the guest's checksums (the 64-bit FNV prime).
pub const CHECKSUM_PRIME: u64 = 0x100_0000_01b3;
