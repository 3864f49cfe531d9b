#define _GNU_SOURCE
#include "nvmeof_shim.h"

#include <errno.h>
#include <fcntl.h>
#include <libnvme.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

struct nvmeof_connection {
    nvme_root_t root;
    nvme_ctrl_t ctrl;
};

static void say(char *error, size_t capacity, const char *what, int err) {
    if (error && capacity) snprintf(error, capacity, "%s: %s", what, strerror(err));
}

int nvmeof_fabrics_available(void) {
    return access("/dev/nvme-fabrics", R_OK | W_OK) == 0 ? 0 : -errno;
}

static const char *trtype_name(uint8_t type) {
    switch (type) {
    case NVMF_TRTYPE_RDMA: return "rdma";
    case NVMF_TRTYPE_FC: return "fc";
    case NVMF_TRTYPE_TCP: return "tcp";
    case NVMF_TRTYPE_LOOP: return "loop";
    default: return "unspecified";
    }
}

/* Copies a fixed-width, space-padded discovery log field. */
static void field(char *out, size_t capacity, const char *in, size_t width) {
    size_t n = strnlen(in, width);
    while (n > 0 && (in[n - 1] == ' ' || in[n - 1] == '\0')) n--;
    if (n >= capacity) n = capacity - 1;
    memcpy(out, in, n);
    out[n] = 0;
}

static nvme_root_t open_root(nvme_host_t *host) {
    nvme_root_t root = nvme_create_root(NULL, LOG_ERR);
    if (!root) return NULL;
    nvme_scan_topology(root, NULL, NULL);
    *host = nvme_default_host(root);
    if (!*host) {
        nvme_free_tree(root);
        return NULL;
    }
    return root;
}

int nvmeof_discover(const char *trtype, const char *traddr, const char *trsvcid, const char *host_traddr,
                    nvmeof_disc_entry *out, size_t capacity, char *error, size_t error_capacity) {
    int status = nvmeof_fabrics_available();
    if (status) { say(error, error_capacity, "/dev/nvme-fabrics", -status); return status; }
    nvme_host_t host = NULL;
    nvme_root_t root = open_root(&host);
    if (!root) { say(error, error_capacity, "libnvme topology", errno ? errno : ENOMEM); return -(errno ? errno : ENOMEM); }
    nvme_ctrl_t ctrl = nvme_create_ctrl(root, NVME_DISC_SUBSYS_NAME, trtype, traddr, host_traddr, NULL, trsvcid);
    if (!ctrl) {
        status = -(errno ? errno : EINVAL);
        say(error, error_capacity, "discovery controller", -status);
        nvme_free_tree(root);
        return status;
    }
    struct nvme_fabrics_config config;
    nvmf_default_config(&config);
    if (nvmf_add_ctrl(host, ctrl, &config) != 0) {
        status = -(errno ? errno : EIO);
        say(error, error_capacity, "connect to the discovery controller", -status);
        nvme_free_ctrl(ctrl);
        nvme_free_tree(root);
        return status;
    }
    struct nvmf_discovery_log *log = NULL;
    if (nvmf_get_discovery_log(ctrl, &log, 3) != 0 || !log) {
        status = -(errno ? errno : EIO);
        say(error, error_capacity, "discovery log page", -status);
    } else {
        uint64_t count = le64toh(log->numrec);
        for (uint64_t i = 0; i < count && i < capacity; i++) {
            struct nvmf_disc_log_entry *e = &log->entries[i];
            snprintf(out[i].trtype, sizeof out[i].trtype, "%s", trtype_name(e->trtype));
            field(out[i].traddr, sizeof out[i].traddr, e->traddr, sizeof e->traddr);
            field(out[i].trsvcid, sizeof out[i].trsvcid, e->trsvcid, sizeof e->trsvcid);
            field(out[i].subnqn, sizeof out[i].subnqn, e->subnqn, sizeof e->subnqn);
            out[i].subtype = e->subtype;
        }
        status = (int)count;
        free(log);
    }
    nvme_disconnect_ctrl(ctrl);
    nvme_free_tree(root);
    return status;
}

int nvmeof_connect(const char *trtype, const char *traddr, const char *trsvcid, const char *host_traddr, const char *nqn,
                   nvmeof_connection **out, char *name, size_t name_capacity, char *error, size_t error_capacity) {
    *out = NULL;
    if (name && name_capacity) name[0] = 0;
    int status = nvmeof_fabrics_available();
    if (status) { say(error, error_capacity, "/dev/nvme-fabrics", -status); return status; }
    nvme_host_t host = NULL;
    nvme_root_t root = open_root(&host);
    if (!root) { say(error, error_capacity, "libnvme topology", errno ? errno : ENOMEM); return -(errno ? errno : ENOMEM); }
    nvme_ctrl_t ctrl = nvme_create_ctrl(root, nqn, trtype, traddr, host_traddr, NULL, trsvcid);
    if (!ctrl) {
        status = -(errno ? errno : EINVAL);
        say(error, error_capacity, "controller", -status);
        nvme_free_tree(root);
        return status;
    }
    struct nvme_fabrics_config config;
    nvmf_default_config(&config);
    config.duplicate_connect = false;
    if (nvmf_add_ctrl(host, ctrl, &config) != 0) {
        status = -(errno ? errno : EIO);
        nvme_free_ctrl(ctrl);
        nvme_free_tree(root);
        if (status == -EALREADY) return 0; /* connected before us: not ours to disconnect */
        say(error, error_capacity, "connect", -status);
        return status;
    }
    if (name && name_capacity && nvme_ctrl_get_name(ctrl)) snprintf(name, name_capacity, "%s", nvme_ctrl_get_name(ctrl));
    struct nvmeof_connection *c = calloc(1, sizeof *c);
    if (!c) {
        nvme_disconnect_ctrl(ctrl);
        nvme_free_tree(root);
        return -ENOMEM;
    }
    c->root = root;
    c->ctrl = ctrl;
    *out = c;
    return 0;
}

int nvmeof_disconnect(nvmeof_connection *c) {
    if (!c) return 0;
    int status = nvme_disconnect_ctrl(c->ctrl) == 0 ? 0 : -(errno ? errno : EIO);
    nvme_free_tree(c->root);
    free(c);
    return status;
}

static int identity_of(const struct stat *st, char *identity, size_t capacity) {
    if (S_ISBLK(st->st_mode))
        snprintf(identity, capacity, "b:%u:%u", major(st->st_rdev), minor(st->st_rdev));
    else if (S_ISREG(st->st_mode))
        snprintf(identity, capacity, "f:%llu:%llu", (unsigned long long)st->st_dev, (unsigned long long)st->st_ino);
    else
        return -ENOTSUP;
    return 0;
}

int nvmeof_identity(const char *path, char *identity, size_t capacity) {
    struct stat st;
    if (stat(path, &st) != 0) return -errno;
    return identity_of(&st, identity, capacity);
}

int nvmeof_open(const char *path, int direct, uint64_t *size, uint32_t *block, int *is_direct,
                char *identity, size_t identity_capacity) {
    int fd = -1;
    *is_direct = 0;
    if (direct) {
        fd = open(path, O_RDWR | O_DIRECT | O_CLOEXEC);
        if (fd >= 0) *is_direct = 1;
        else if (errno != EINVAL) return -errno;
    }
    if (fd < 0) fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) return -errno;
    struct stat st;
    if (fstat(fd, &st) != 0 || identity_of(&st, identity, identity_capacity) != 0) {
        int err = S_ISBLK(st.st_mode) || S_ISREG(st.st_mode) ? errno : ENOTSUP;
        close(fd);
        return -err;
    }
    if (S_ISBLK(st.st_mode)) {
        int sector = 512;
        if (ioctl(fd, BLKGETSIZE64, size) != 0 || ioctl(fd, BLKSSZGET, &sector) != 0) {
            int err = errno;
            close(fd);
            return -err;
        }
        *block = *is_direct ? (uint32_t)sector : 1;
    } else {
        *size = (uint64_t)st.st_size;
        /* Files under O_DIRECT: the file system's block size is always a safe alignment. */
        *block = *is_direct ? (uint32_t)(st.st_blksize > 0 ? st.st_blksize : 4096) : 1;
    }
    return fd;
}

int nvmeof_pread_full(int fd, void *buffer, uint64_t length, uint64_t offset) {
    char *p = buffer;
    while (length > 0) {
        ssize_t n = pread(fd, p, length, (off_t)offset);
        if (n < 0) { if (errno == EINTR) continue; return -errno; }
        if (n == 0) return -EIO;
        p += n; length -= (uint64_t)n; offset += (uint64_t)n;
    }
    return 0;
}

int nvmeof_pwrite_full(int fd, const void *buffer, uint64_t length, uint64_t offset) {
    const char *p = buffer;
    while (length > 0) {
        ssize_t n = pwrite(fd, p, length, (off_t)offset);
        if (n < 0) { if (errno == EINTR) continue; return -errno; }
        if (n == 0) return -EIO;
        p += n; length -= (uint64_t)n; offset += (uint64_t)n;
    }
    return 0;
}
