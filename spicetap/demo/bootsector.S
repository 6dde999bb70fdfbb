/*
 * spicetap's demo and test guest: a 512-byte MBR that keeps the VGA screen moving.
 *
 * Mode 13h (320x200, 256 colours). Every BIOS timer tick (18.2 Hz) it redraws
 * the whole screen with colour = (column - frame) XOR (row + frame): two
 * gradients sliding in opposite directions, so each frame differs everywhere
 * and the SPICE display channel never goes idle. HLT between frames keeps the
 * host CPU cost of TCG low. Once in mode 13h it writes the READY line the
 * harness waits for to COM1.
 *
 * Build: as --32 -o b.o bootsector.S
 *        ld -m elf_i386 -Ttext=0x7c00 --oformat binary -o b.bin b.o
 * The assembled bytes are committed in guest.py (so `spicetap demo` needs no
 * assembler); tests/test_demo.py checks they are current with this source.
 */
        .code16
        .text
        .globl  _start
_start:
        cli
        xorw    %ax, %ax
        movw    %ax, %ds
        movw    %ax, %ss
        movw    $0x7c00, %sp
        sti
        movw    $0x0013, %ax            /* set video mode 13h */
        int     $0x10
        /* tell the harness (serial console, COM1) that mode 13h is on;
           QEMU's UART takes bytes without any set-up */
        movw    $ready, %si
        movw    $0x3f8, %dx
        cld
say:
        lodsb
        testb   %al, %al
        jz      said
        outb    %al, %dx
        jmp     say
said:
        movw    $0xa000, %ax
        movw    %ax, %es
        xorw    %bp, %bp                /* frame number */
frame:
        xorw    %di, %di                /* offset into video memory */
        xorw    %dx, %dx                /* row */
row:
        movw    %dx, %bx
        addw    %bp, %bx                /* bl = row + frame */
        xorw    %cx, %cx                /* column */
pixel:
        movw    %cx, %ax
        subw    %bp, %ax                /* al = column - frame */
        xorb    %bl, %al
        stosb
        incw    %cx
        cmpw    $320, %cx
        jb      pixel
        incw    %dx
        cmpw    $200, %dx
        jb      row
        incw    %bp
        hlt                             /* wait for the next timer tick */
        jmp     frame

ready:
        .asciz  "tapguest: READY (boot sector)\r\n"

        .org    510
        .byte   0x55, 0xaa
