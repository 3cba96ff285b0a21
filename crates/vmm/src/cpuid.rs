//! CPUID for each vCPU: the host features KVM supports, passed through, with the topology of
//! a VM of N single-threaded cores in one socket, and APIC ID = vCPU index.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

/// vCPU i has APIC ID i: the MADT and the vCPU's CPUID must agree on that.
pub fn apic_id(vcpu_index: u32) -> u32 {
    vcpu_index
}

/// Bits needed to number `count` items (the x2APIC "shift" for a topology level).
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const ECX_AMD_CMP_LEGACY: u32 = 1 << 1;

/// x2APIC topology level types (CPUID 0xB/0x1F ECX[15:8]).
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Adapts the host's supported CPUID to vCPU `index` of `count`.
pub fn for_vcpu(supported: &CpuId, index: u32, count: u32) -> CpuId {
    let mut cpuid = supported.clone();
    let id = apic_id(index);
    for entry in cpuid.as_mut_slice() {
        patch_entry(entry, id, count);
    }
    cpuid
}

fn patch_entry(entry: &mut kvm_cpuid_entry2, apic_id: u32, count: u32) {
    match entry.function {
        LEAF_FEATURES => {
            // EBX: [31:24] initial APIC ID, [23:16] logical processors per package,
            // [15:8] CLFLUSH line size in 8-byte units.
            entry.ebx = (apic_id << 24) | ((count.min(255)) << 16) | (8 << 8) | (entry.ebx & 0xff);
            entry.ecx |= ECX_HYPERVISOR;
            if count > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_PARAMS => {
            // EAX[31:26]: cores per package - 1. EAX[25:14]: threads sharing this cache - 1:
            // caches up to L2 are private to a core (one thread), L3 is shared by the package.
            let level = (entry.eax >> 5) & 0x7;
            let sharing = if level >= 3 { count - 1 } else { 0 };
            entry.eax =
                (entry.eax & 0x3fff) | (sharing.min(0xfff) << 14) | ((count - 1).min(63) << 26);
        }
        LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
            entry.edx = apic_id;
            match entry.index {
                0 => {
                    // SMT level: one thread per core.
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = (LEVEL_SMT << 8) | entry.index;
                }
                1 => {
                    entry.eax = id_bits(count);
                    entry.ebx = count;
                    entry.ecx = (LEVEL_CORE << 8) | entry.index;
                }
                _ => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = entry.index;
                }
            }
        }
        LEAF_AMD_EXT_FEATURES => {
            if count > 1 {
                entry.ecx |= ECX_AMD_CMP_LEGACY;
            } else {
                entry.ecx &= !ECX_AMD_CMP_LEGACY;
            }
        }
        LEAF_AMD_SIZES => {
            // ECX[15:12]: APIC ID bits for cores; ECX[7:0]: cores - 1.
            let bits = id_bits(count).max(1);
            entry.ecx = (entry.ecx & !0xf0ff) | (bits << 12) | (count - 1).min(255);
        }
        LEAF_AMD_TOPOLOGY => {
            // EAX: extended APIC ID; EBX[15:8]: threads per core - 1, [7:0]: core ID; ECX: node 0.
            entry.eax = apic_id;
            entry.ebx = apic_id & 0xff;
            entry.ecx = 0;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn supported() -> CpuId {
        let entries = [
            leaf(0x0, 0),
            kvm_cpuid_entry2 {
                ebx: 0xff00_0000 | 0x00ff_0000 | 0x42,
                ..leaf(0x1, 0)
            },
            kvm_cpuid_entry2 {
                eax: (1 << 5) | 0x1,
                ..leaf(0x4, 0)
            },
            kvm_cpuid_entry2 {
                eax: (3 << 5) | 0x3,
                ..leaf(0x4, 3)
            },
            leaf(0xb, 0),
            leaf(0xb, 1),
            leaf(0xb, 2),
            leaf(0x8000_0001, 0),
            leaf(0x8000_0008, 0),
            leaf(0x8000_001e, 0),
        ];
        CpuId::from_entries(&entries).expect("cpuid")
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .expect("leaf present")
    }

    #[test]
    fn id_bits_rounds_up_to_a_power_of_two() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let c = for_vcpu(&supported(), 3, 4);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xff, 0x42, "brand index kept");
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        let single = find(&for_vcpu(&supported(), 0, 1), 1, 0);
        assert_eq!(single.edx & EDX_HTT, 0);
    }

    #[test]
    fn x2apic_topology_has_n_cores_of_one_thread() {
        let c = for_vcpu(&supported(), 2, 3);
        let smt = find(&c, 0xb, 0);
        let core = find(&c, 0xb, 1);
        let end = find(&c, 0xb, 2);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
        assert_eq!((end.ebx, (end.ecx >> 8) & 0xff), (0, 0));
    }

    #[test]
    fn cache_leaf_shares_l3_only() {
        let c = for_vcpu(&supported(), 0, 4);
        let l1d = find(&c, 4, 0);
        let l3 = find(&c, 4, 3);
        assert_eq!(l1d.eax >> 26, 3);
        assert_eq!((l1d.eax >> 14) & 0xfff, 0);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        assert_eq!(l3.eax & 0x3fff, (3 << 5) | 3, "cache level bits kept");
    }

    #[test]
    fn amd_leaves_describe_the_same_topology() {
        let c = for_vcpu(&supported(), 5, 6);
        assert_eq!(find(&c, 0x8000_0008, 0).ecx & 0xff, 5);
        assert_eq!((find(&c, 0x8000_0008, 0).ecx >> 12) & 0xf, 3);
        assert_ne!(find(&c, 0x8000_0001, 0).ecx & ECX_AMD_CMP_LEGACY, 0);
        assert_eq!(find(&c, 0x8000_001e, 0).eax, 5);
    }
}
