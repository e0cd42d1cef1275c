import { defineConfig } from "vite";

// The page is served under /shop/ beside the API (same origin: no CORS). `npm run dev`
// proxies the API to BOXOFFICE_URL (a local `boxoffice serve` or the fleet's nginx).
const api = process.env.BOXOFFICE_URL ?? "http://127.0.0.1:3000";

export default defineConfig({
  base: "/shop/",
  server: { proxy: { "/api": api, "/health": api } },
  // dist/shop/: nginx serves dist/ as its root, so the files sit under /shop/.
  build: { target: "es2022", outDir: "dist/shop", emptyOutDir: true },
});
