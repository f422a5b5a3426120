-- Configuration Manager 2509 applies to sites at 2403 (build 9128) through 2503 (build 9135).
-- The last statement answers: 1 applicable, 0 not applicable, 2 hidden (superseded).
SELECT CASE
    WHEN dbo.fnCurrentSiteVersion_INT() BETWEEN 5009128 AND 5009135 THEN 1
    ELSE PRINT('Site version ' || dbo.fnCurrentSiteVersion() || ' cannot be updated to 2509, skip this update')
END AS Applicable;
