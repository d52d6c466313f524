/* Architecture-neutral stand-in for <asm/types.h>: clang -target bpf does not
 * search the host's multiarch include directory, and the BPF programs only need
 * the generic fixed-width types. */
#ifndef NODEAGENT_ASM_TYPES_H
#define NODEAGENT_ASM_TYPES_H
#include <asm-generic/int-ll64.h>
#endif
