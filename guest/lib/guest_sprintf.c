/*
 * guest_sprintf.c: formatting for GUEST_PRINTF and the asserts' messages, in
 * the guest, as KVM selftests' lib/guest_sprintf.c does it (there is no libc).
 *
 * Conversions: d i u x X o c s p %.  Qualifiers: hh h l ll z t j (ll, z, t, j
 * are 64 bits like l: guests are 64-bit).  Flags: - + space # 0.  Width and
 * precision, each a number or '*'.  As upstream (the kernel's vsprintf): "%#x"
 * of 0 is "0x0", "%p" is "%#016lx" (the width counts the "0x"), an unknown
 * conversion prints itself.  "%s" of NULL is "(null)".  Output that does not
 * fit is cut (the buffer always ends with a NUL); the return value is the
 * length written.
 */
#include "emu.h"

#define F_LEFT  1
#define F_PLUS  2
#define F_SPACE 4
#define F_ALT   8
#define F_ZERO  16

struct out {
	char *buf;
	int room;               /* characters that fit before the NUL */
	int len;                /* characters written */
};

static void put(struct out *o, char c)
{
	if (o->len < o->room)
		o->buf[o->len++] = c;
}

static void pad(struct out *o, char c, int count)
{
	while (count-- > 0)
		put(o, c);
}

static int is_digit(char c)
{
	return c >= '0' && c <= '9';
}

static int read_number(const char **fmt)
{
	int n = 0;

	while (is_digit(**fmt))
		n = n * 10 + *(*fmt)++ - '0';
	return n;
}

static void put_number(struct out *o, u64 num, int base, int upper, int negative, int flags, int width,
		       int precision)
{
	const char *set = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	char digits[24];
	char sign = 0;
	const char *prefix = "";
	int nd = 0, body, plen = 0;

	if (negative)
		sign = '-';
	else if (flags & F_PLUS)
		sign = '+';
	else if (flags & F_SPACE)
		sign = ' ';
	if (flags & F_ALT) {
		if (base == 16)
			prefix = upper ? "0X" : "0x";
		else if (base == 8)
			prefix = "0";
	}
	while (prefix[plen])
		plen++;
	do {
		digits[nd++] = set[num % base];
		num /= base;
	} while (num);
	if (base == 8 && plen && digits[nd - 1] == '0')
		plen = 0, prefix = "";                  /* "%#o" of 0 is "0" */
	body = nd > precision ? nd : precision;
	width -= body + plen + (sign ? 1 : 0);
	if (!(flags & (F_LEFT | F_ZERO)))
		pad(o, ' ', width);
	if (sign)
		put(o, sign);
	while (*prefix)
		put(o, *prefix++);
	if ((flags & F_ZERO) && !(flags & F_LEFT))
		pad(o, '0', width);
	pad(o, '0', precision - nd);
	while (nd)
		put(o, digits[--nd]);
	if (flags & F_LEFT)
		pad(o, ' ', width);
}

int guest_vsnprintf(char *buf, int n, const char *fmt, __builtin_va_list args)
{
	struct out o = { buf, n > 0 ? n - 1 : 0, 0 };

	if (n <= 0)
		return 0;
	for (; *fmt; fmt++) {
		int flags = 0, width = -1, precision = -1, qualifier = 0, base = 10, is_signed = 0, upper = 0;
		u64 num;
		s64 snum;

		if (*fmt != '%') {
			put(&o, *fmt);
			continue;
		}
		for (;;) {                              /* flags */
			char c = *++fmt;

			if (c == '-')
				flags |= F_LEFT;
			else if (c == '+')
				flags |= F_PLUS;
			else if (c == ' ')
				flags |= F_SPACE;
			else if (c == '#')
				flags |= F_ALT;
			else if (c == '0')
				flags |= F_ZERO;
			else
				break;
		}
		if (is_digit(*fmt)) {                   /* width */
			width = read_number(&fmt);
		} else if (*fmt == '*') {
			fmt++;
			width = __builtin_va_arg(args, int);
			if (width < 0) {
				width = -width;
				flags |= F_LEFT;
			}
		}
		if (*fmt == '.') {                      /* precision */
			fmt++;
			if (is_digit(*fmt)) {
				precision = read_number(&fmt);
			} else if (*fmt == '*') {
				fmt++;
				precision = __builtin_va_arg(args, int);
			} else {
				precision = 0;
			}
			if (precision < 0)
				precision = -1;
		}
		if (*fmt == 'h') {                      /* qualifier */
			qualifier = 'h';
			if (*++fmt == 'h') {
				qualifier = 'H';
				fmt++;
			}
		} else if (*fmt == 'l' || *fmt == 'L' || *fmt == 'z' || *fmt == 't' || *fmt == 'j') {
			qualifier = 'l';
			if (*fmt++ == 'l' && *fmt == 'l')
				fmt++;
		}
		switch (*fmt) {
		case 'c':
			if (!(flags & F_LEFT))
				pad(&o, ' ', width - 1);
			put(&o, (char)__builtin_va_arg(args, int));
			if (flags & F_LEFT)
				pad(&o, ' ', width - 1);
			continue;
		case 's': {
			const char *s = __builtin_va_arg(args, const char *);
			int len = 0;

			if (!s)
				s = "(null)";
			while (s[len] && (precision < 0 || len < precision))
				len++;
			if (!(flags & F_LEFT))
				pad(&o, ' ', width - len);
			for (int i = 0; i < len; i++)
				put(&o, s[i]);
			if (flags & F_LEFT)
				pad(&o, ' ', width - len);
			continue;
		}
		case 'p':
			if (width < 0) {
				width = 2 * (int)sizeof(void *);
				flags |= F_ZERO;
			}
			flags |= F_ALT;
			put_number(&o, (u64)__builtin_va_arg(args, void *), 16, 0, 0, flags, width,
				   precision < 0 ? 1 : precision);
			continue;
		case '%':
			put(&o, '%');
			continue;
		case 'o':
			base = 8;
			break;
		case 'X':
			upper = 1;
			/* fall through */
		case 'x':
			base = 16;
			break;
		case 'd':
		case 'i':
			is_signed = 1;
			break;
		case 'u':
			break;
		default:
			put(&o, '%');
			if (*fmt)
				put(&o, *fmt);
			else
				fmt--;
			continue;
		}
		if (qualifier == 'l') {
			num = __builtin_va_arg(args, u64);
			snum = (s64)num;
		} else if (qualifier == 'h') {
			num = (u16)__builtin_va_arg(args, int);
			snum = (s16)num;
		} else if (qualifier == 'H') {
			num = (u8)__builtin_va_arg(args, int);
			snum = (s8)num;
		} else if (is_signed) {
			snum = __builtin_va_arg(args, int);
			num = (u64)snum;
		} else {
			num = __builtin_va_arg(args, unsigned int);
			snum = (s64)num;
		}
		if (precision >= 0)
			flags &= ~F_ZERO;               /* a precision overrides the 0 flag (C) */
		if (is_signed && snum < 0)
			put_number(&o, -(u64)snum, base, upper, 1, flags, width, precision < 0 ? 1 : precision);
		else
			put_number(&o, is_signed ? (u64)snum : num, base, upper, 0, flags, width,
				   precision < 0 ? 1 : precision);
	}
	buf[o.len] = '\0';
	return o.len;
}

int guest_snprintf(char *buf, int n, const char *fmt, ...)
{
	__builtin_va_list va;
	int len;

	__builtin_va_start(va, fmt);
	len = guest_vsnprintf(buf, n, fmt, va);
	__builtin_va_end(va);
	return len;
}
