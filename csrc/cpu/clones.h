// Per-ISA builds of the CPU kernels' hot loops. A function marked INMAP_CLONES is compiled for
// the baseline x86-64 and for AVX2 + FMA (x86-64-v3) and AVX-512 (x86-64-v4), and the loader
// picks the widest the CPU has (GCC / Clang target_clones, ELF ifunc): the loops vectorise 8 or
// 16 floats wide where the CPU can, and the package still runs on any x86-64. Its loops are
// written inline (INMAP_ALWAYS_INLINE) into the cloned function so that every clone vectorises
// them its own way. The bits of a result may differ between CPU types (vector width, FMA); on
// one CPU they do not depend on the number of threads.
#pragma once

#if defined(__GNUC__) || defined(__clang__)
#define INMAP_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define INMAP_ALWAYS_INLINE inline
#endif

// target_clones needs the loader's ifunc support: ELF platforms (Linux); elsewhere one build.
#if defined(__x86_64__) && defined(__ELF__) && (defined(__GNUC__) || defined(__clang__))
#define INMAP_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define INMAP_CLONES_V3 __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define INMAP_CLONES
#define INMAP_CLONES_V3
#endif
