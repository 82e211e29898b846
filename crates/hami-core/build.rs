//! Link libvgpu.so with `-z nodelete`: other libraries (the CUDA runtime)
//! keep pointers to our hooks, so the library must never be unmapped, even
//! if someone `dlclose`s it.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
}
