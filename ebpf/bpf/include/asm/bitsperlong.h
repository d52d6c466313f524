/* Architecture-neutral stand-in for <asm/bitsperlong.h> (see types.h). */
#ifndef NODEAGENT_ASM_BITSPERLONG_H
#define NODEAGENT_ASM_BITSPERLONG_H
#include <asm-generic/bitsperlong.h>
#endif
