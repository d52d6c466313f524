/* Architecture-neutral stand-in for <asm/posix_types.h> (see types.h). */
#ifndef NODEAGENT_ASM_POSIX_TYPES_H
#define NODEAGENT_ASM_POSIX_TYPES_H
#include <asm-generic/posix_types.h>
#endif
