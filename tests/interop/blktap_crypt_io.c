/*
 * Read or write sectors of an encrypted VHD the way blktap's tapdisk does,
 * with blktap's own code: libvhd (vhd/lib) for the layout (BAT, bitmaps,
 * block allocation) and drivers/crypto/xts_aes.c + xts_aes.h for AES-XTS
 * with its "plain" IV (the sector number cut to 32 bits), one 512-byte
 * sector at a time, as drivers/block-crypto.c calls them. Sectors whose
 * bitmap bit is clear read as zeros (what the guest sees) and are not
 * decrypted. The key is checked against the keyhash first (SHA-256 over
 * the nonce and the key, as block-crypto.c's check_key).
 *
 * Local interop check only (tests/interop/blktap-tools.sh compiles it
 * against a blktap build tree); not part of tapjail or its CI.
 *
 *   blktap_crypt_io read  IMAGE KEYFILE SECTOR COUNT > plaintext
 *   blktap_crypt_io write IMAGE KEYFILE SECTOR COUNT < plaintext
 *
 * Exit 0 on success, 3 when the key does not match, 1 on other errors.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "libvhd.h"
#include "crypto/compat-crypto-openssl.h"
#include "crypto/xts_aes.h"

#define SECTOR 512

static void die(const char *what, int err)
{
	fprintf(stderr, "blktap_crypt_io: %s: %s\n", what, strerror(err < 0 ? -err : err));
	exit(1);
}

static size_t read_all(int fd, uint8_t *buf, size_t len)
{
	size_t got = 0;
	while (got < len) {
		ssize_t n = read(fd, buf + got, len - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		got += (size_t)n;
	}
	return got;
}

static int key_matches(vhd_context_t *vhd, const uint8_t *key, size_t len)
{
	struct vhd_keyhash kh;
	uint8_t hash[32];
	unsigned int hlen = 0;
	EVP_MD_CTX *md;
	int err = vhd_get_keyhash(vhd, &kh);

	if (err)
		die("reading the keyhash", err);
	if (!kh.cookie) {
		fprintf(stderr, "blktap_crypt_io: %s has no keyhash\n", vhd->file);
		exit(1);
	}
	md = EVP_MD_CTX_new();
	if (!md || !EVP_DigestInit_ex(md, EVP_sha256(), NULL) ||
	    !EVP_DigestUpdate(md, kh.nonce, sizeof(kh.nonce)) ||
	    !EVP_DigestUpdate(md, key, len) || !EVP_DigestFinal_ex(md, hash, &hlen))
		die("sha256", EIO);
	EVP_MD_CTX_free(md);
	return hlen == sizeof(hash) && !memcmp(hash, kh.hash, sizeof(hash));
}

/* Whether the guest's sector holds data written to this image. */
static int present(vhd_context_t *vhd, uint64_t sec)
{
	uint32_t blk = (uint32_t)(sec / vhd->spb);
	char *bm = NULL;
	int err, set;

	if (blk >= vhd->bat.entries || vhd->bat.bat[blk] == DD_BLK_UNUSED)
		return 0;
	err = vhd_read_bitmap(vhd, blk, &bm);
	if (err)
		die("reading a bitmap", err);
	set = vhd_bitmap_test(vhd, bm, (uint32_t)(sec % vhd->spb));
	free(bm);
	return set;
}

int main(int argc, char **argv)
{
	vhd_context_t vhd;
	struct crypto_blkcipher *tfm;
	uint8_t key[129], *buf, *out;
	size_t keylen;
	uint64_t first, count, i;
	int writing, err, fd;
	FILE *kf;

	if (argc != 6 || (strcmp(argv[1], "read") && strcmp(argv[1], "write"))) {
		fprintf(stderr, "usage: %s read|write IMAGE KEYFILE SECTOR COUNT\n", argv[0]);
		return 1;
	}
	writing = !strcmp(argv[1], "write");
	first = strtoull(argv[4], NULL, 10);
	count = strtoull(argv[5], NULL, 10);
	kf = fopen(argv[3], "rb");
	if (!kf)
		die(argv[3], errno);
	keylen = fread(key, 1, sizeof(key), kf);
	fclose(kf);
	if (keylen != 32 && keylen != 64) {
		fprintf(stderr, "blktap_crypt_io: key is %zu bytes, not 32 or 64\n", keylen);
		return 1;
	}
	err = vhd_open(&vhd, argv[2], writing ? VHD_OPEN_RDWR : VHD_OPEN_RDONLY);
	if (err)
		die(argv[2], err);
	if (!key_matches(&vhd, key, keylen)) {
		fprintf(stderr, "blktap_crypt_io: the key does not match %s's keyhash\n", argv[2]);
		return 3;
	}
	err = vhd_get_bat(&vhd);
	if (err)
		die("reading the BAT", err);
	tfm = xts_aes_setup();
	if (!tfm || xts_aes_setkey(tfm, key, (unsigned int)keylen))
		die("AES-XTS setup", EINVAL);
	/* libvhd opens images O_DIRECT: buffers are page aligned. */
	if (posix_memalign((void **)&buf, 4096, count * SECTOR) ||
	    posix_memalign((void **)&out, 4096, count * SECTOR))
		die("posix_memalign", ENOMEM);

	if (writing) {
		if (read_all(0, buf, count * SECTOR) != count * SECTOR)
			die("stdin shorter than COUNT sectors", EIO);
		for (i = 0; i < count; i++)
			if (xts_aes_plain_encrypt(tfm, first + i, out + i * SECTOR,
						  buf + i * SECTOR, SECTOR))
				die("encrypt", EIO);
		err = vhd_io_write(&vhd, (char *)out, first, (uint32_t)count);
		if (err)
			die("vhd_io_write", err);
	} else {
		err = vhd_io_read(&vhd, (char *)buf, first, (uint32_t)count);
		if (err)
			die("vhd_io_read", err);
		for (i = 0; i < count; i++) {
			if (!present(&vhd, first + i)) {
				memset(out + i * SECTOR, 0, SECTOR);
				continue;
			}
			if (xts_aes_plain_decrypt(tfm, first + i, out + i * SECTOR,
						  buf + i * SECTOR, SECTOR))
				die("decrypt", EIO);
		}
		fd = 1;
		for (i = 0; i < count * SECTOR;) {
			ssize_t n = write(fd, out + i, count * SECTOR - i);
			if (n <= 0)
				die("stdout", errno);
			i += (uint64_t)n;
		}
	}
	vhd_close(&vhd);
	return 0;
}
